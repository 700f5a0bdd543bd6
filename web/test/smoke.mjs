// Opens the dashboard of a running server in Chromium and checks that it goes live; for trying a
// deployment by hand. Environment: ORGPULSE_URL (e.g. http://127.0.0.1:8080), ORGPULSE_TOKEN,
// optional ORGPULSE_SCREENSHOT (a .png path) and CHROMIUM. Exits non-zero when the page is not
// live within 15 s.
import { launchChromium, recordBadge } from "./browser.mjs";

const { ORGPULSE_URL: url, ORGPULSE_TOKEN: token, ORGPULSE_SCREENSHOT: shot } = process.env;
if (!url || !token) {
  console.error("set ORGPULSE_URL and ORGPULSE_TOKEN");
  process.exit(2);
}
const browser = await launchChromium();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.addInitScript(recordBadge);
  await page.goto(`${url.replace(/\/$/, "")}/#token=${encodeURIComponent(token)}`, { timeout: 10_000 });
  await page.waitForSelector('[data-testid="connection-badge"][data-state="live"]', { timeout: 15_000 });
  const rows = await page.locator('[data-testid="job-row"]').count();
  console.log(`live; ${rows} job rows; badge states ${JSON.stringify(await page.evaluate(() => window.__badgeStates))}`);
  if (shot) await page.screenshot({ path: shot, fullPage: true, animations: "disabled" });
} finally {
  await browser.close();
}
