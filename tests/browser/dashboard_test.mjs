// The web dashboard in a real browser: headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core) signs in with an API key made by `halyard apikey create`,
// sees the live numbers move while mosquitto_pub publishes, watches the topic tap, browses
// and deletes a retained message, stops and starts a listener, and kicks a mosquitto_sub
// client from the page. Screenshots go to docs/ (dashboard.png, dashboard-tap.png).
//
// Usage: node dashboard_test.mjs [path/to/halyard]   (run `npm ci` here first)
import { spawn, spawnSync, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { freePort, waitPort } from "./net.mjs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.argv[2] ?? join(here, "../../target/release/halyard");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const docs = join(here, "../../docs");
const WAIT = 15_000;

const check = (cond, what) => {
  if (!cond) throw new Error(`FAILED: ${what}`);
  console.log(`ok - ${what}`);
};
const num = (s) => Number(String(s).replace(/[^0-9.]/g, ""));

const dir = mkdtempSync(join(tmpdir(), "halyard-dash-"));
const children = [];
let browser;
try {
  const [mqtt, mqtt2, admin] = [await freePort(), await freePort(), await freePort()];
  writeFileSync(
    join(dir, "halyard.toml"),
    `listen = ["tcp://127.0.0.1:${mqtt}", "tcp://127.0.0.1:${mqtt2}"]
data_dir = "${dir}"
sys_interval = 1
[admin]
listen = "http://127.0.0.1:${admin}"
`,
  );
  const key = execFileSync(bin, ["apikey", "create", "dashboard", "--data-dir", dir], {
    stdio: ["ignore", "pipe", "ignore"],
  })
    .toString()
    .trim();
  const [name, secret] = key.split(":");
  check(name === "dashboard" && secret.length >= 20, "halyard apikey create prints name:secret");

  const broker = spawn(bin, ["serve", "-c", join(dir, "halyard.toml")], { stdio: "ignore" });
  children.push(broker);
  await waitPort(mqtt);
  await waitPort(admin);

  // A subscriber to kick later, and a retained message to browse.
  const victim = spawn("mosquitto_sub", ["-p", `${mqtt}`, "-t", "demo/#", "-i", "kick-me", "-V", "mqttv5"], {
    stdio: "ignore",
  });
  children.push(victim);
  execFileSync("mosquitto_pub", ["-p", `${mqtt}`, "-t", "demo/retained/one", "-m", "kept for later", "-r", "-q", "1"]);

  browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1250 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`http://127.0.0.1:${admin}/`);
  await page.waitForSelector("#login-name", { state: "visible", timeout: WAIT });
  await page.fill("#login-name", name);
  await page.fill("#login-secret", "wrong-secret");
  await page.click("#login-btn");
  await page.waitForFunction(() => document.querySelector("#login-error").textContent.includes("refused"), null, {
    timeout: WAIT,
  });
  check(true, "a wrong secret is refused on the login form");
  await page.fill("#login-secret", secret);
  await page.click("#login-btn");
  await page.waitForFunction(() => document.body.dataset.state === "live", null, { timeout: WAIT });
  check(true, "signed in; the page polls live stats");

  // A publisher: one QoS 1 message every 10 ms on demo/counter.
  const publisher = spawn("mosquitto_pub", ["-p", `${mqtt}`, "-t", "demo/counter", "-l", "-q", "1", "-i", "pub"], {
    stdio: ["pipe", "ignore", "ignore"],
  });
  children.push(publisher);
  let n = 0;
  const feed = setInterval(() => publisher.stdin.write(`message ${n++}\n`), 10);

  const before = num(await page.textContent("#stat-received"));
  await page.waitForFunction(
    (b) => Number(document.querySelector("#stat-received").textContent.replace(/[^0-9]/g, "")) > b + 100,
    before,
    { timeout: WAIT },
  );
  await page.waitForFunction(() => Number(document.querySelector("#stat-in-rate").textContent.replace(/[^0-9]/g, "")) > 0, null, {
    timeout: WAIT,
  });
  const after = num(await page.textContent("#stat-received"));
  check(after > before + 100, `received total climbs while the publisher runs (${before} -> ${after})`);
  const conns = num(await page.textContent("#stat-connections"));
  check(conns >= 2, `connections card shows the open clients (${conns})`);

  // Clients table lists both MQTT clients.
  await page.waitForSelector('#clients-table tr[data-client-id="kick-me"] .kick', { timeout: WAIT });
  await page.waitForSelector('#clients-table tr[data-client-id="pub"]', { timeout: WAIT });
  check(true, "clients table lists the subscriber and the publisher");
  await page.waitForFunction(
    () => [...document.querySelectorAll("#subs-table td")].some((td) => td.textContent === "demo/#"),
    null,
    { timeout: WAIT },
  );
  check(true, "subscriptions table shows demo/#");

  // Topic tap: live messages on demo/# appear in the page.
  await page.fill("#tap-filter", "demo/#");
  await page.click("#tap-start");
  await page.waitForFunction(
    () => [...document.querySelectorAll("#tap-list .tap-message")].filter((d) => d.textContent.includes("demo/counter")).length >= 5,
    null,
    { timeout: WAIT },
  );
  check(true, "topic tap shows live messages on demo/#");
  await page.waitForTimeout(6000); // let the charts draw some seconds of traffic
  mkdirSync(docs, { recursive: true });
  await page.screenshot({ path: join(docs, "dashboard.png"), fullPage: true });

  // Retained browser: read, then delete.
  await page.fill("#retained-filter", "demo/#");
  await page.click("#retained-go");
  await page.waitForSelector('#retained-table tr[data-topic="demo/retained/one"]', { timeout: WAIT });
  check(
    (await page.textContent('#retained-table tr[data-topic="demo/retained/one"]')).includes("kept for later"),
    "retained browser shows the retained payload",
  );
  await page.click('#retained-table tr[data-topic="demo/retained/one"] .retained-delete');
  await page.waitForSelector('#retained-table tr[data-topic="demo/retained/one"]', { state: "detached", timeout: WAIT });
  // -W 1: exits 27 after a second with nothing received.
  const left = spawnSync("mosquitto_sub", ["-p", `${mqtt}`, "-t", "demo/retained/#", "-W", "1", "--retained-only"], {
    stdio: ["ignore", "pipe", "ignore"],
  }).stdout.toString();
  check(left === "", "the deleted retained message is gone for MQTT subscribers too");

  // Listeners: stop the second one from the page, see it refuse connections, start it again.
  const second = `tcp://127.0.0.1:${mqtt2}`;
  await page.click(`#listeners-table tr[data-listener="${second}"] .listener-stop`);
  await page.waitForSelector(`#listeners-table tr[data-listener="${second}"] .listener-start`, { timeout: WAIT });
  let refused = false;
  try {
    execFileSync("mosquitto_pub", ["-p", `${mqtt2}`, "-t", "x", "-m", "y"], { stdio: "ignore" });
  } catch {
    refused = true;
  }
  check(refused, "a listener stopped from the page refuses connections");
  await page.click(`#listeners-table tr[data-listener="${second}"] .listener-start`);
  await page.waitForSelector(`#listeners-table tr[data-listener="${second}"] .listener-stop`, { timeout: WAIT });
  execFileSync("mosquitto_pub", ["-p", `${mqtt2}`, "-t", "x", "-m", "y"], { stdio: "ignore" });
  check(true, "started again from the page, it accepts connections");

  // Kick the subscriber from the page: mosquitto_sub gets DISCONNECT 0x98 and exits.
  const exited = new Promise((resolve) => victim.on("exit", () => resolve(true)));
  await page.click('#clients-table tr[data-client-id="kick-me"] .kick');
  const gone = await Promise.race([exited, new Promise((r) => setTimeout(() => r(false), WAIT))]);
  check(gone, "kicking kick-me from the page disconnects the real client");
  await page.waitForSelector('#clients-table tr[data-client-id="kick-me"]', { state: "detached", timeout: WAIT });
  check(true, "the clients table drops the kicked client");
  await page.screenshot({ path: join(docs, "dashboard-tap.png"), clip: { x: 0, y: 650, width: 1400, height: 600 } });

  clearInterval(feed);
  publisher.stdin.end();
  check(errors.length === 0, `no script errors in the page (${errors.join("; ")})`);
  console.log("dashboard: all checks passed");
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  for (const c of children) c.kill();
  rmSync(dir, { recursive: true, force: true });
}
