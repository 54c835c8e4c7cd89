// Page-load check of the Gradio UI in a real headless Chromium:
//   node tests/browser/ui_smoke.mjs --url URL --screenshot PATH [--timeout SECONDS]
// Checks the title and that the main controls render, types a script and waits for the live parse
// preview and the speaker names in the voice labels, loads an example script, and reads where the
// footer's "Use via API" leads.
// Prints one JSON line; exits non-zero on failure.
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
  "#queue",
  "#example-0",
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
    for (const name of ["Queue", "Gallery", "History", "Two portraits", "One scene + boxes", "One person", "Upload audio"]) {
      if ((await page.getByRole("tab", { name }).count()) < 1) throw new Error(`tab ${name} is missing`);
    }
    await page.locator("#script-box textarea").fill("Ann: Hello there!\nBen: Hi Ann.");
    await page.locator("#parse-preview").getByText("2 turns").waitFor({ timeout });
    // The speaker names reach the voice labels through a State change (a second server round trip).
    await page.locator("#voice2").getByText("Ben").first().waitFor({ timeout });
    // An example button fills the box (the "A: / B:" example has three turns).
    await page.getByText("Script formats, pauses and examples").click();
    await page.getByRole("button", { name: "A: / B:" }).click();
    await page.locator("#parse-preview").getByText("3 turns").waitFor({ timeout });
    const preview = await page.locator("#parse-preview").innerText();
    if (!preview.includes("letters")) throw new Error(`parse preview shows ${JSON.stringify(preview)}`);
    const apiLink = await page.locator("#api-link").evaluate((a) => a.href);
    await page.screenshot({ path: args.screenshot, fullPage: true });
    console.log(JSON.stringify({ ok: true, title, api_link: apiLink, launch_ms: launched - t0,
                                 load_ms: loaded - launched, total_ms: Date.now() - t0 }));
  } finally {
    await close();
  }
});
