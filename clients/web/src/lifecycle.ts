//! The page's life as it matters to a connection: offline / online, the back/forward cache
//! (pagehide / pageshow), a tab becoming visible again, and a machine waking from sleep (timers
//! that fired far too late). The client disconnects on the first of each pair and reconnects at
//! once, without waiting out a backoff, on the second.

export interface LifecycleEvents {
  /** Disconnect (offline, page going into the back/forward cache). */
  suspend(reason: string): void;
  /** Connect again now (online, page shown, tab visible). */
  resume(): void;
  /** Timers stalled (sleep): the connection may be dead without knowing it; reopen it. */
  woke(): void;
  /** The page is going away or into the cache: release what other tabs could take over. */
  hidden(): void;
  /** The page is back from the cache. */
  shown(): void;
}

const SLEEP_TICK_MS = 2_000;
const SLEEP_GAP_MS = 10_000;

/** Installs the page listeners; returns the function that removes them (no-op outside a browser). */
export function watchLifecycle(on: LifecycleEvents): () => void {
  if (typeof window === "undefined" || typeof document === "undefined") return () => {};
  const offline = () => on.suspend("the browser is offline");
  const online = () => on.resume();
  const pagehide = () => {
    on.suspend("the page was hidden");
    on.hidden();
  };
  const pageshow = (e: PageTransitionEvent) => {
    if (!e.persisted) return;
    on.shown();
    on.resume();
  };
  const visibility = () => {
    if (document.visibilityState === "visible") on.resume();
  };
  let last = Date.now();
  const tick = setInterval(() => {
    const now = Date.now();
    if (now - last > SLEEP_GAP_MS) on.woke();
    last = now;
  }, SLEEP_TICK_MS);
  window.addEventListener("offline", offline);
  window.addEventListener("online", online);
  window.addEventListener("pagehide", pagehide);
  window.addEventListener("pageshow", pageshow);
  document.addEventListener("visibilitychange", visibility);
  return () => {
    clearInterval(tick);
    window.removeEventListener("offline", offline);
    window.removeEventListener("online", online);
    window.removeEventListener("pagehide", pagehide);
    window.removeEventListener("pageshow", pageshow);
    document.removeEventListener("visibilitychange", visibility);
  };
}
