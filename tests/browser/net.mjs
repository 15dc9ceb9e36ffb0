// Loopback helpers shared by the browser tests.
import { createConnection, createServer } from "node:net";

/** A port free on 127.0.0.1 right now. */
export const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

/** Resolves once something accepts connections on 127.0.0.1:port (10 s at most). */
export const waitPort = async (port) => {
  for (let i = 0; i < 200; i++) {
    const ok = await new Promise((resolve) => {
      const c = createConnection({ host: "127.0.0.1", port }, () => {
        c.end();
        resolve(true);
      });
      c.on("error", () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nothing listening on ${port}`);
};
