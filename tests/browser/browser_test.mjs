// A real browser test: headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) loads a page that uses MQTT.js over ws:// to subscribe to the Halyard
// broker; mosquitto_pub publishes over tcp://; the test asserts the message arrived in the
// page. Done for MQTT 3.1.1 and 5.0.
//
// Usage: node browser_test.mjs [path/to/halyard]   (run `npm ci` here first)
import { spawn, execFileSync } from "node:child_process";
import { createServer, request } from "node:http";
import { readFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { freePort, waitPort } from "./net.mjs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.argv[2] ?? join(here, "../../target/release/halyard");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const WAIT = 10_000;


const mqttJs = readFileSync(join(here, "node_modules/mqtt/dist/mqtt.min.js"));
const page = (wsUrl, version) => `<!doctype html>
<html><head><meta charset="utf-8"><title>Halyard browser test</title>
<script src="/mqtt.min.js"></script></head>
<body data-state="loading"><h1>MQTT ${version === 5 ? "5.0" : "3.1.1"} over WebSocket</h1>
<ul id="messages"></ul>
<script>
  const client = mqtt.connect(${JSON.stringify(wsUrl)}, {
    protocolVersion: ${version}, clientId: "browser-${version}", reconnectPeriod: 0 });
  client.on("connect", () => {
    client.subscribe("browser/t", { qos: 1 }, (err) => {
      document.body.dataset.state = err ? "suberror: " + err : "subscribed";
    });
  });
  client.on("message", (topic, payload) => {
    const li = document.createElement("li");
    li.textContent = topic + " " + payload.toString();
    document.getElementById("messages").appendChild(li);
    document.body.dataset.state = "received";
  });
  client.on("error", (e) => { document.body.dataset.state = "error: " + e.message; });
</script></body></html>`;

let failed = 0;
let passed = 0;
const work = mkdtempSync(join(tmpdir(), "halyard-browser-"));
const tcp = await freePort();
const ws = await freePort();
const httpPort = await freePort();
// The page comes from another origin than the ws:// listener: it must be allowed by name
// (an empty allowed_origins serves the listener's own origin only).
const broker = spawn(bin, ["serve", "--data-dir", join(work, "data"),
  "--listen", `tcp://127.0.0.1:${tcp}`,
  "--listen", `ws://127.0.0.1:${ws}/mqtt?allowed_origins=http://127.0.0.1:${httpPort}`],
  { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, RUST_LOG: "warn" } });
let browser;
let http;
try {
  await waitPort(tcp);
  await waitPort(ws);
  let version = 4;
  http = createServer((req, res) => {
    if (req.url === "/mqtt.min.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(mqttJs);
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(page(`ws://127.0.0.1:${ws}/mqtt`, version));
    }
  });
  await new Promise((r) => http.listen(httpPort, "127.0.0.1", r));
  // A page from anywhere else cannot open the broker's WebSocket (cross-site WebSocket
  // hijacking): the upgrade a browser would send from http://evil.example gets 403.
  const status = await new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port: ws, path: "/mqtt", headers: {
      Connection: "Upgrade", Upgrade: "websocket", "Sec-WebSocket-Version": "13",
      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": "mqtt",
      Origin: "http://evil.example" } });
    req.on("response", (res) => { res.resume(); resolve(res.statusCode); });
    req.on("upgrade", () => resolve(101));
    req.on("error", reject);
    req.end();
  });
  if (status === 403) {
    passed++;
    console.log("ok   browser: a WebSocket upgrade from an origin not in allowed_origins gets 403");
  } else {
    failed++;
    console.log(`FAIL browser: upgrade from http://evil.example answered ${status}, not 403`);
  }
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  for (const v of [4, 5]) {
    version = v;
    const name = v === 5 ? "MQTT 5.0" : "MQTT 3.1.1";
    const p = await browser.newPage();
    await p.goto(`http://127.0.0.1:${httpPort}/`);
    try {
      await p.waitForFunction(() => document.body.dataset.state === "subscribed", null, { timeout: WAIT });
      const text = `hello browser from mosquitto_pub (${name})`;
      execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", String(tcp), "-t", "browser/t", "-q", "1", "-m", text]);
      await p.waitForFunction(() => document.body.dataset.state === "received", null, { timeout: WAIT });
      const got = await p.textContent("#messages li");
      if (got === `browser/t ${text}`) {
        passed++;
        console.log(`ok   browser (Chromium, MQTT.js) ${name} over ws:// received a mosquitto_pub message`);
      } else {
        failed++;
        console.log(`FAIL browser ${name}: page shows '${got}'`);
      }
    } catch (e) {
      failed++;
      const state = await p.evaluate(() => document.body.dataset.state).catch(() => "?");
      console.log(`FAIL browser ${name}: ${e.message.split("\n")[0]} (page state: ${state})`);
    }
    await p.close();
  }
} finally {
  if (browser) await browser.close();
  if (http) http.close();
  broker.kill("SIGTERM");
  await new Promise((r) => broker.once("exit", r));
  rmSync(work, { recursive: true, force: true });
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed || !passed ? 1 : 0);
