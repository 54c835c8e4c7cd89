// The live queue panel in a real headless Chromium, against a service whose engine is held (jobs wait):
//   node tests/browser/ui_queue.mjs --url URL --screenshot PATH [--timeout SECONDS]
// Fills the form from an example, submits two jobs (two seeds), waits until the queue panel lists both
// with their positions and the tab says "Queue (2)", cancels the second from its row, and waits until the
// panel and the header show one waiting job. Prints one JSON line; exits non-zero on failure.
import { openBrowser, parseArgs, run } from "./lib.mjs";

run(async () => {
  const args = parseArgs(process.argv.slice(2), ["url", "screenshot"]);
  const step = 1000 * Number(args.timeout || 60);
  const { page, close } = await openBrowser({ width: 1440, height: 900 });
  const jobId = () => page.locator("#job-id textarea, #job-id input").first().inputValue();
  const submit = async (seed, previous) => {
    await page.locator("#seed input").fill(seed);
    await page.locator("#seed input").press("Tab");
    await page.locator("#generate-btn").click();
    await page.waitForFunction((prev) => {
      const v = document.querySelector("#job-id textarea, #job-id input")?.value || "";
      return /^[0-9a-f]{32}$/.test(v) && v !== prev;
    }, previous, { timeout: step });
    return jobId();
  };
  try {
    await page.goto(args.url, { timeout: step, waitUntil: "domcontentloaded" });
    await page.locator("#generate-btn").waitFor({ timeout: step });
    await page.locator("#example-0").click();
    await page.waitForFunction(() => document.querySelector("#script-box textarea").value.includes("Hi Ben"), null, { timeout: step });
    await page.locator("#advanced").getByText("Advanced settings").click();
    const first = await submit("101", "");
    const second = await submit("102", first);
    const rows = page.locator("#queue tr[data-job]");
    await page.waitForFunction(() => document.querySelectorAll("#queue tr[data-job]").length === 2, null, { timeout: step });
    const order = await rows.evaluateAll((trs) => trs.map((tr) => [tr.dataset.job, tr.cells[0].innerText.trim()]));
    await page.getByRole("tab", { name: "Queue (2)" }).waitFor({ timeout: step });
    await page.screenshot({ path: args.screenshot });
    await page.locator(`#queue tr[data-job="${second}"] [data-action="cancel"]`).click();
    await page.waitForFunction(() => document.querySelectorAll("#queue tr[data-job]").length === 1, null, { timeout: step });
    await page.getByRole("tab", { name: "Queue (1)" }).waitFor({ timeout: step });
    await page.locator("#service-info").getByText("1 job waiting").waitFor({ timeout: step });
    // The cancelled job is the one on screen: its status says so (the row's message gives way to it).
    await page.locator("#job-status").getByText("Cancelled.").waitFor({ timeout: step });
    const status = (await page.locator("#job-status").innerText()).replace(/\s+/g, " ").trim();
    console.log(JSON.stringify({ ok: true, first, second, order, status }));
  } finally {
    await close();
  }
});
