// The whole page in a real headless Chromium, against one running service:
//   node tests/browser/ui_flow.mjs --url URL --left PNG --right PNG --bad PNG --text TXT --artifacts DIR
//        [--timeout SECONDS]
// 1. desktop 1440x900: Generate and the result area are on screen without scrolling (screenshot);
// 2. a WAV renamed .png and a .txt as portrait 1 get our sentence naming the field (no framework error),
//    Generate without pictures names the missing one; both sentences go when a real portrait is uploaded;
// 3. fill every field, double-click Generate (one job), wait for the video and the named downloads;
// 4. an example fills the whole form with other values; "Load settings" on the job's history row brings
//    every field back (the values are printed for the test to compare);
// 5. the gallery shows the job with a thumbnail; its "New seed" makes a second job, whose "Delete" removes it;
// 6. a 390-px phone shows one column with Generate at hand (screenshots).
// Prints one JSON line; exits non-zero on failure (a screenshot of the failure is saved).
import { join } from "node:path";
import { openBrowser, parseArgs, run } from "./lib.mjs";

const FORM = {
  script: "Ann: Hello, nice to meet you.\nBen: Nice to meet you too!\nAnn: Shall we begin?",
  prompt: "Two colleagues in a quiet library.",
  voice2: "bf_emma",
  aspect: "4:3",
  steps: "20",
  seed: "1234",
  maxLength: "30",
};

/** Every form value as the page shows it. */
function readForm() {
  const q = (s) => document.querySelector(s);
  const val = (s) => (q(s) ? q(s).value : null);
  const checked = (id) => {
    const r = q(`#${id} input[type=radio]:checked`);
    return r ? r.value : null;
  };
  const img = (id) => {
    const i = q(`#${id} img`);
    return i ? decodeURIComponent(i.getAttribute("src") || "") : null;
  };
  return {
    left: img("left-portrait"),
    right: img("right-portrait"),
    layout: checked("layout"),
    backdrop: val("#backdrop input"),
    aspect: val("#aspect input"),
    script: val("#script-box textarea"),
    voice1: val("#voice1 input"),
    voice2: val("#voice2 input"),
    prompt: val("#prompt textarea"),
    preset: checked("preset"),
    resolution: checked("resolution"),
    steps: val("#steps input[type=number]"),
    text_guidance: val("#text-guidance input[type=number]"),
    audio_guidance: val("#audio-guidance input[type=number]"),
    seed: val("#seed input"),
    max_length: val("#max-length input"),
    length_unit: checked("length-unit"),
    color_correction: val("#color-correction input[type=number]"),
    apg: q("#apg input") ? q("#apg input").checked : null,
    negative_prompt: val("#negative-prompt textarea"),
  };
}

run(async () => {
  const args = parseArgs(process.argv.slice(2), ["url", "left", "right", "bad", "text", "artifacts"]);
  const timeout = 1000 * Number(args.timeout || 120);
  const step = Math.min(timeout, 30_000);
  const t0 = Date.now();
  const marks = {};
  const mark = (name) => (marks[`${name}_ms`] = Date.now() - t0);
  const { context, page, close } = await openBrowser({ width: 1440, height: 900 });
  page.on("dialog", (d) => d.accept());
  const shot = (name, fullPage = false) => page.screenshot({ path: join(args.artifacts, name), fullPage });
  const pick = async (id, label) => {
    await page.locator(`#${id} input`).click();
    await page.locator(`#${id} [role=option][aria-label^="${label}"]`).first().click();
  };
  const setNumber = async (sel, value) => {
    const input = page.locator(sel);
    await input.fill(value);
    await input.press("Tab");
  };
  try {
    await page.goto(args.url, { timeout: step, waitUntil: "domcontentloaded" });
    await page.locator("#generate-btn").waitFor({ timeout: step });
    await page.locator("#queue .dv-empty, #queue table").first().waitFor({ timeout: step });  // the lists arrived
    mark("page");
    const inView = async (sel) => {
      const box = await page.locator(sel).first().boundingBox();
      return Boolean(box && box.y >= 0 && box.y + box.height <= 900 && box.x + box.width <= 1440);
    };
    const desktop = { generate: await inView("#generate-btn"), result: await inView("#result-video") };
    await shot("desktop-1440x900.png");

    // -- a WAV renamed .png as a portrait: our own sentence, naming the field
    await page.locator("#left-portrait input[type=file]").setInputFiles(args.bad);
    await page.locator("#left-message").getByText("Portrait of person 1 (left)").waitFor({ timeout: step });
    const badMessage = (await page.locator("#left-message").innerText()).trim();
    // A file of a type the upload box would refuse on its own (a .txt): our sentence too, no toast.
    await page.locator("#left-portrait input[type=file]").setInputFiles(args.text);
    await page.locator("#left-message").getByText("text/plain").waitFor({ timeout: step });
    const typeMessage = (await page.locator("#left-message").innerText()).trim();
    const frameworkErrors = await page.locator(".toast-body").allInnerTexts();
    await shot("bad-upload.png");
    // Generate without pictures names the missing one; the sentence goes once the form changes.
    await page.locator("#generate-btn").click();
    await page.locator("#submit-message").getByText("required").waitFor({ timeout: step });
    const requiredMessage = (await page.locator("#submit-message").innerText()).trim();
    mark("bad_upload");

    // -- fill every field
    await page.locator("#left-portrait input[type=file]").setInputFiles(args.left);
    await page.locator("#right-portrait input[type=file]").setInputFiles(args.right);
    await page.locator("#overlay-preview img").waitFor({ timeout: step });
    const clearedMessage = (await page.locator("#left-message").innerText()).trim();
    const clearedRequired = (await page.locator("#submit-message").innerText()).trim();
    await page.locator("#layout").getByText("Shared backdrop").click();
    await pick("backdrop", "Plain colour");
    await pick("aspect", FORM.aspect);
    await page.locator("#script-box textarea").fill(FORM.script);
    await page.locator("#parse-preview").getByText("3 turns").waitFor({ timeout: step });
    await pick("voice2", FORM.voice2);
    await page.locator("#prompt textarea").fill(FORM.prompt);
    await page.locator("#preset").getByText("Fast", { exact: true }).click();
    await page.locator("#advanced").getByText("Advanced settings").click();
    await setNumber("#steps input[type=number]", FORM.steps);
    await setNumber("#seed input", FORM.seed);
    await setNumber("#max-length input", FORM.maxLength);
    // A preset picked after the user's own values keeps them, and says so.
    await page.locator("#preset").getByText("Quality", { exact: true }).click();
    await page.locator("#preset-note").getByText("kept the ones you set").waitFor({ timeout: step });
    const presetNote = (await page.locator("#preset-note").innerText()).trim();
    await page.locator("#preset").getByText("Fast", { exact: true }).click();
    await page.locator("#preset-note").getByText("Fast preset").waitFor({ timeout: step });
    const sent = await page.evaluate(readForm);
    mark("filled");

    // -- a double click on Generate makes one job
    await page.locator("#generate-btn").dblclick();
    await page.waitForFunction(() => /^[0-9a-f]{32}$/.test(document.querySelector("#job-id textarea, #job-id input")?.value || ""),
      null, { timeout: step }).catch(async (err) => {
      const msg = await page.locator("#submit-message").innerText().catch(() => "");
      throw new Error(`no job id after Generate (${msg || err.message})`);
    });  // prettier-ignore
    const jobId = await page.locator("#job-id textarea, #job-id input").first().inputValue();
    mark("submitted");
    await page.waitForFunction(() => {
      const v = document.querySelector("#result-video video");
      return Boolean(v && (v.currentSrc || v.getAttribute("src")));
    }, null, { timeout: Math.max(1000, timeout - (Date.now() - t0)), polling: 250 });
    await page.locator("#dl-video").waitFor({ timeout: step });
    mark("video");
    const downloads = [];  // the names the browser saves the files under
    for (const id of ["dl-video", "dl-srt", "dl-vtt", "dl-zip"]) {
      const [download] = await Promise.all([page.waitForEvent("download", { timeout: step }), page.locator(`#${id}`).click()]);
      downloads.push(download.suggestedFilename());
    }
    const statusText = (await page.locator("#job-status").innerText()).replace(/\s+/g, " ").trim();
    const submitMessage = (await page.locator("#submit-message").innerText()).trim();
    await shot("desktop-result.png");

    // -- an example fills the whole form; "Load settings" on the history row brings ours back
    await page.locator("#example-0").click();
    await page.waitForFunction(() => document.querySelector("#script-box textarea").value.includes("Hi Ben"), null, { timeout: step });
    const example = await page.evaluate(readForm);
    mark("example");
    await page.locator("#jobs-tabs").getByRole("tab", { name: "History" }).click();
    const row = page.locator(`#history tr[data-job="${jobId}"]`);
    await row.waitFor({ timeout: step });
    mark("history_row");
    await row.locator('[data-action="load"]').click();
    // Wait until every field shows what was sent (the follow-up events settle); the test compares after.
    await page.waitForFunction(([src, want]) => {
      const now = (0, eval)(`(${src})`)();
      return Object.keys(want).every((k) => (k === "left" || k === "right" ? Boolean(now[k]) : now[k] === want[k]));
    }, [readForm.toString(), sent], { timeout: step, polling: 250 }).catch(() => {});
    const loaded = await page.evaluate(readForm);
    const formMessage = (await page.locator("#form-message").innerText()).trim();
    mark("loaded");

    // -- the gallery has the job with a thumbnail and a named download
    await page.locator("#jobs-tabs").getByRole("tab", { name: "Gallery" }).click();
    const card = page.locator(`#gallery .dv-card[data-job="${jobId}"]`);
    await card.waitFor({ timeout: step });
    await page.waitForFunction((id) => {
      const img = document.querySelector(`#gallery .dv-card[data-job="${id}"] img`);
      return Boolean(img && img.complete && img.naturalWidth > 0);
    }, jobId, { timeout: step });
    const galleryLink = decodeURIComponent((await card.locator("a[download]").getAttribute("href")) || "");
    await shot("desktop-full.png", true);

    // -- "New seed" on the gallery card renders the same inputs again; "Delete" removes that new job
    await card.locator('[data-action="seed"]').click();
    await page.waitForFunction((id) => {
      const v = document.querySelector("#job-id textarea, #job-id input")?.value || "";
      return /^[0-9a-f]{32}$/.test(v) && v !== id;
    }, jobId, { timeout: step });
    const seedJob = await page.locator("#job-id textarea, #job-id input").first().inputValue();
    const seedCard = page.locator(`#gallery .dv-card[data-job="${seedJob}"]`);
    await seedCard.waitFor({ timeout: step });
    await seedCard.locator('[data-action="delete"]').click();
    await seedCard.waitFor({ state: "detached", timeout: step });
    const deleted = page.locator("#submit-message").getByText("Deleted job");
    await deleted.waitFor({ timeout: step });
    const afterDelete = (await deleted.innerText()).trim();
    mark("seed_and_delete");

    // -- a 390-px phone: one column, Generate at hand on the first screen
    const phone = await context.newPage();
    await phone.setViewportSize({ width: 390, height: 844 });
    await phone.goto(args.url, { timeout: step, waitUntil: "domcontentloaded" });
    await phone.locator("#generate-btn").waitFor({ timeout: step });
    await phone.waitForTimeout(1000);
    const gen = await phone.locator("#generate-btn").boundingBox();
    const inputs = await phone.locator("#dv-inputs").boundingBox();
    const output = await phone.locator("#dv-output").boundingBox();
    const phoneInfo = {
      generate_on_screen: Boolean(gen && gen.y >= 0 && gen.y + gen.height <= 844),
      one_column: Boolean(inputs && output && output.y >= inputs.y + inputs.height - 1 && inputs.width > 300),
      page_height: await phone.evaluate(() => document.documentElement.scrollHeight),
    };
    await phone.screenshot({ path: join(args.artifacts, "phone-390.png") });
    await phone.screenshot({ path: join(args.artifacts, "phone-390-full.png"), fullPage: true });
    mark("phone");
    console.log(JSON.stringify({
      ok: true, job_id: jobId, desktop, bad_message: badMessage, type_message: typeMessage,
      framework_errors: frameworkErrors, required_message: requiredMessage, cleared_required: clearedRequired,
      cleared_message: clearedMessage, preset_note: presetNote, sent, example, loaded, form_message: formMessage,
      downloads, status: statusText, submit_message: submitMessage, gallery_link: galleryLink, phone: phoneInfo,
      seed_job: seedJob, after_delete: afterDelete,
      ...marks, total_ms: Date.now() - t0,
    }));  // prettier-ignore
  } catch (err) {
    await shot("failure.png", true).catch(() => {});
    throw err;
  } finally {
    await close();
  }
});
