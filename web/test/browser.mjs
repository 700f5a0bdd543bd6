// Launches Debian's Chromium for the browser tests through playwright-core (never a downloaded
// browser), with the flags these tests rely on; playwright gives it a fresh user-data-dir.
import { chromium } from "playwright-core";

const ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

/** Environment: CHROMIUM (default /usr/bin/chromium). */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ARGS,
    timeout: 30_000,
  });
}

/** An init script: every state the connection badge shows is appended to window.__badgeStates. */
export function recordBadge() {
  window.__badgeStates = [];
  new MutationObserver(() => {
    const b = document.querySelector('[data-testid="connection-badge"]');
    const s = b && b.dataset.state;
    if (s && window.__badgeStates.at(-1) !== s) window.__badgeStates.push(s);
  }).observe(document, { subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"] });
}
