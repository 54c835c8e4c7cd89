// Shared helpers of the browser tests: argument parsing and a headless system Chromium via playwright-core.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
// Offline and quiet: no GPU, no QUIC, no background traffic, no first-run UI.
export const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** `--name value` pairs -> object; `required` names must be present. */
export function parseArgs(argv, required) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new Error(`unexpected argument ${arg}`);
    const key = arg.slice(2);
    const value = argv[i + 1];
    if (value === undefined || value.startsWith("--")) throw new Error(`--${key} needs a value`);
    out[key] = value;
    i++;
  }
  for (const name of required) {
    if (out[name] === undefined) throw new Error(`missing --${name}`);
  }
  return out;
}

/** A fresh profile (--user-data-dir) each run; returns {context, page, close}. */
export async function openBrowser(viewport = { width: 1400, height: 1000 }) {
  const profile = mkdtempSync(join(tmpdir(), "ui-browser-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport,
  });
  const page = context.pages()[0] || (await context.newPage());
  const close = async () => {
    try {
      await context.close();
    } finally {
      rmSync(profile, { recursive: true, force: true });
    }
  };
  return { context, page, close };
}

/** Run main(); print the error and exit 1 on failure. */
export function run(main) {
  main().then(
    () => process.exit(0),
    (err) => {
      console.error(`FAIL: ${err && err.stack ? err.stack : err}`);
      process.exit(1);
    },
  );
}
