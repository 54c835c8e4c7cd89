// End-to-end run of the Gradio UI in a real headless Chromium:
//   node tests/browser/ui_e2e.mjs --url URL --left PNG --right PNG --screenshot PATH [--timeout SECONDS]
//        [--preset fast|balanced|quality] [--script TEXT]
// Uploads two portraits, waits for the who-is-where preview, enters a script, picks the preset, presses
// Generate, waits until the result <video> has a src (or --timeout seconds), reopens the page without ?job=
// and checks it reattaches to the job (browser storage), then saves a full-page screenshot.
// Prints one JSON line {ok, job_id, ...timings}; exits non-zero on failure (screenshot saved anyway).
import { openBrowser, parseArgs, run } from "./lib.mjs";

const PRESET_LABELS = { fast: "Fast", balanced: "Balanced", quality: "Quality" };
const DEFAULT_SCRIPT = "(s1) Hello, nice to meet you.\n(s2) Nice to meet you too!";

run(async () => {
  const args = parseArgs(process.argv.slice(2), ["url", "left", "right", "screenshot"]);
  const timeout = 1000 * Number(args.timeout || 300);
  const step = Math.min(timeout, 60_000);
  const presetLabel = PRESET_LABELS[args.preset || "fast"];
  if (!presetLabel) throw new Error(`unknown --preset ${args.preset}`);
  const t0 = Date.now();
  const { page, close } = await openBrowser();
  const marks = {};
  const mark = (name) => (marks[`${name}_ms`] = Date.now() - t0);
  try {
    await page.goto(args.url, { timeout: step, waitUntil: "domcontentloaded" });
    await page.locator("#generate-btn").waitFor({ timeout: step });
    mark("page");
    await page.locator("#left-portrait input[type=file]").setInputFiles(args.left);
    await page.locator("#right-portrait input[type=file]").setInputFiles(args.right);
    await page.locator("#overlay-preview img").waitFor({ timeout: step });
    mark("overlay");
    await page.locator("#script-box textarea").fill(args.script || DEFAULT_SCRIPT);
    await page.locator("#parse-preview").getByText("turns").first().waitFor({ timeout: step });
    await page.locator("#preset").getByText(presetLabel, { exact: true }).click();
    await page.locator("#generate-btn").click();
    const jobBox = page.locator("#job-id textarea, #job-id input").first();
    await page.waitForFunction(
      () => {
        const el = document.querySelector("#job-id textarea, #job-id input");
        return el && /^[0-9a-f]{32}$/.test(el.value);
      },
      null,
      { timeout: step },
    ).catch(async (err) => {
      const msg = await page.locator("#submit-message").innerText().catch(() => "");
      throw new Error(`no job id after Generate (${msg || err.message})`);
    });
    const jobId = await jobBox.inputValue();
    mark("submitted");
    const remaining = Math.max(1000, timeout - (Date.now() - t0));
    await page.waitForFunction(
      () => {
        const v = document.querySelector("#result-video video");
        return Boolean(v && (v.currentSrc || v.getAttribute("src")));
      },
      null,
      { timeout: remaining, polling: 500 },
    ).catch(async (err) => {
      const status = await page.locator("#job-status").innerText().catch(() => "");
      throw new Error(`no video for job ${jobId} (${status.replace(/\s+/g, " ").trim() || err.message})`);
    });
    mark("video");
    const src = await page.locator("#result-video video").first().evaluate((v) => v.currentSrc || v.src);
    // Subtitles arrive as a <track> of the video (gradio renders one per subtitle file).
    const subtitles = await page.locator("#result-video video track").count();
    const url = new URL(page.url());
    if (url.searchParams.get("job") !== jobId) throw new Error(`address bar has job=${url.searchParams.get("job")}`);
    // Reopen the bare address (no ?job=): the job id kept in the browser's localStorage reattaches it.
    await page.goto(args.url, { timeout: step, waitUntil: "domcontentloaded" });
    await page.waitForFunction(
      (id) => {
        const el = document.querySelector("#job-id textarea, #job-id input");
        const v = document.querySelector("#result-video video");
        return el && el.value === id && v && (v.currentSrc || v.getAttribute("src"));
      },
      jobId,
      { timeout: step, polling: 250 },
    ).catch(() => {
      throw new Error(`reopening ${args.url} did not reattach to job ${jobId}`);
    });
    mark("reattached");
    await page.screenshot({ path: args.screenshot, fullPage: true });
    console.log(JSON.stringify({ ok: true, job_id: jobId, video_src: src, subtitle_tracks: subtitles, ...marks, total_ms: Date.now() - t0 }));
  } catch (err) {
    await page.screenshot({ path: args.screenshot, fullPage: true }).catch(() => {});
    throw err;
  } finally {
    await close();
  }
});
