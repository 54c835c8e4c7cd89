// Page-load check of the Gradio UI in a real headless Chromium:
//   node tests/browser/ui_smoke.mjs --url URL --screenshot PATH [--timeout SECONDS]
// Checks the title and that the main controls render, types a script and waits for the live parse
// preview (a server round trip). Prints one JSON line; exits non-zero on failure.
import { openBrowser, parseArgs, run } from "./lib.mjs";

const CONTROLS = [
  "#left-portrait input[type=file]",
  "#right-portrait input[type=file]",
  "#script-box textarea",
  "#voice1",
  "#voice2",
  "#preset",
  "#generate-btn",
  "#job-status",
  "#history",
];

run(async () => {
  const args = parseArgs(process.argv.slice(2), ["url", "screenshot"]);
  const timeout = 1000 * Number(args.timeout || 60);
  const t0 = Date.now();
  const { page, close } = await openBrowser();
  try {
    const launched = Date.now();
    await page.goto(args.url, { timeout, waitUntil: "domcontentloaded" });
    await page.locator("#generate-btn").waitFor({ timeout });
    const loaded = Date.now();
    const title = await page.title();
    if (title !== "Dialogue video") throw new Error(`title is ${JSON.stringify(title)}`);
    for (const sel of CONTROLS) {
      if ((await page.locator(sel).count()) < 1) throw new Error(`control ${sel} is missing`);
    }
    await page.locator("#script-box textarea").fill("Alice: Hello there!\nBob: Hi Alice.");
    await page.locator("#parse-preview").getByText("Alice").first().waitFor({ timeout });
    const preview = await page.locator("#parse-preview").innerText();
    if (!preview.includes("2 turns")) throw new Error(`parse preview shows ${JSON.stringify(preview)}`);
    await page.screenshot({ path: args.screenshot, fullPage: true });
    console.log(JSON.stringify({ ok: true, title, launch_ms: launched - t0, load_ms: loaded - launched,
                                 total_ms: Date.now() - t0 }));
  } finally {
    await close();
  }
});
