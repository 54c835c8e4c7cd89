"""The page's CSS (two columns on a desktop, one on a phone with Generate always at hand) and the small
scripts of the job lists (row actions, file links under the app's own root)."""

from __future__ import annotations

UI_CSS = """
#dv-main { align-items: flex-start; }
#dv-output { position: sticky; top: 8px; align-self: flex-start; }
#dv-header p { margin: 0; }
#dv-title h1 { margin: 0 0 2px 0; font-size: 1.5em; }
.dv-section h3 { margin: 4px 0 0 0; }
.dv-examples { flex-wrap: wrap; gap: 6px; align-items: center; }
.dv-examples > * { flex: 0 0 auto !important; width: auto !important; min-width: 0 !important; }
.dv-msg:empty, .dv-msg p:empty { display: none; }
.dv-progress { width: 100%; height: 14px; background: var(--neutral-200, #e5e7eb); border-radius: 7px;
  overflow: hidden; margin: 6px 0; }
.dv-progress > div { height: 100%; background: var(--color-accent, #f97316); transition: width 0.4s; }
.dv-status { font-size: 0.95em; line-height: 1.5; }
.dv-state { font-weight: 600; padding: 1px 8px; border-radius: 8px; background: var(--neutral-100, #f3f4f6);
  white-space: nowrap; }
.dv-state-done { background: #dcfce7; } .dv-state-failed { background: #fee2e2; }
.dv-state-cancelled { background: #e5e7eb; }
.dv-error { color: #b91c1c; }
.dv-steps { font-size: 0.85em; margin: 2px 0 4px 0; }
.dv-step { padding: 0 4px; border-radius: 6px; }
.dv-step-done { color: #15803d; } .dv-step-todo { color: var(--neutral-400, #9ca3af); }
.dv-step-now { background: var(--color-accent-soft, #ffedd5); font-weight: 700; }
.dv-turns td, .dv-turns th { padding: 2px 8px; vertical-align: top; }
#parse-preview { max-height: 220px; overflow-y: auto; }
.dv-jobs { width: 100%; border-collapse: collapse; font-size: 0.9em; }
.dv-jobs td, .dv-jobs th { padding: 4px 6px; border-bottom: 1px solid var(--border-color-primary, #e5e7eb);
  vertical-align: top; text-align: left; }
.dv-acts { white-space: normal; }
.dv-act { display: inline-block; margin: 1px 2px; padding: 1px 8px; border-radius: 6px; font-size: 0.85em;
  border: 1px solid var(--border-color-primary, #d1d5db); background: var(--background-fill-secondary, #f9fafb);
  cursor: pointer; text-decoration: none; color: inherit; }
.dv-act:hover { border-color: var(--color-accent, #f97316); }
.dv-act-stop { color: #b91c1c; }
.dv-gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; }
.dv-card { border: 1px solid var(--border-color-primary, #e5e7eb); border-radius: 8px; padding: 6px; }
.dv-thumb { cursor: pointer; aspect-ratio: 16 / 9; background: #111; border-radius: 6px; overflow: hidden;
  display: flex; align-items: center; justify-content: center; }
.dv-thumb img { max-width: 100%; max-height: 100%; }
.dv-nothumb { color: #9ca3af; font-size: 0.85em; }
.dv-cap { font-size: 0.85em; margin: 4px 0; }
.dv-empty { color: var(--neutral-500, #6b7280); }
#dv-footer { text-align: center; font-size: 0.9em; margin-top: 8px; }
@media (max-width: 1000px) { #dv-output { position: static; } }
@media (max-width: 700px) {
  #dv-generate-bar { position: fixed; left: 0; right: 0; bottom: 0; z-index: 100; margin: 0;
    padding: 8px 12px; background: var(--background-fill-primary, #fff); box-shadow: 0 -2px 10px rgba(0,0,0,.15); }
  .gradio-container { padding-bottom: 84px !important; }
  .dv-jobs td:nth-child(4), .dv-jobs th:nth-child(4), .dv-jobs td:nth-child(2), .dv-jobs th:nth-child(2)
    { display: none; }
}
"""

# js_on_load of the job lists (gr.HTML): a click on [data-action] sends {action, job} to the server;
# links and pictures carry data-file (an absolute path under the outputs folder) and get their URL
# under this app's root, whatever path the app is mounted at.
ACTIONS_JS = """
const base = () => {
  const cfg = window.gradio_config;
  if (cfg && typeof cfg.root === "string" && cfg.root) return cfg.root.replace(/\\/$/, "");
  return new URL(".", document.baseURI).href.replace(/\\/$/, "");
};
const fix = () => {
  element.querySelectorAll("[data-file]").forEach((el) => {
    const url = base() + "/gradio_api/file=" + el.dataset.file;
    const attr = el.tagName === "IMG" ? "src" : "href";
    if (el.getAttribute(attr) !== url) el.setAttribute(attr, url);
  });
};
element.addEventListener("click", (e) => {
  const b = e.target.closest("[data-action]");
  if (!b || !element.contains(b)) return;
  e.preventDefault();
  const job = b.dataset.job || "";
  if (b.dataset.action === "delete" && !window.confirm("Delete job " + job.slice(0, 8) + " and its files?")) return;
  trigger("click", { action: b.dataset.action, job: job });
});
fix();
watch("value", fix);
"""

# Generate: disable the button at once in the browser, so a double click cannot send twice.
DISABLE_GENERATE_JS = """
(...args) => {
  const b = document.querySelector("#generate-btn");
  if (b) b.disabled = true;
  return args;
}
"""

# After a submission on a phone, bring the status into view (the form is above it).
SHOW_STATUS_JS = """
() => {
  if (window.innerWidth <= 1000) {
    const s = document.querySelector("#job-status");
    if (s) s.scrollIntoView({ behavior: "smooth", block: "start" });
  }
  return [];
}
"""

# The address bar keeps ?job=<id> of the job on screen (a reload or a shared link reattaches to it).
JOB_URL_JS = (
    "(id) => { const u = new URL(window.location.href); if (id) { u.searchParams.set('job', id); } "
    "else { u.searchParams.delete('job'); } window.history.replaceState(null, '', u); return []; }"
)

# The REST API (and its OpenAPI page) lives at the server root, beside the mounted page.
FOOTER_HTML = (
    '<div id="dv-footer"><a href="/docs" target="_blank" rel="noopener" id="api-link">Use via API</a> (REST; '
    'OpenAPI schema and a try-it page at <a href="/docs" target="_blank" rel="noopener">/docs</a>) · '
    '<a href="/api/health" target="_blank" rel="noopener">service health</a></div>'
)

# Uploads of a type the browser component would refuse with its own toast ("Invalid file type ... Only
# image/* allowed") are stopped before it sees them, in the capture phase of the file input's change and of
# a drop; the page's own check is asked instead (an "upload" event of the footer with {id, name, type} -> one
# sentence under the field naming it and what is allowed). Runs once, when the footer mounts.
UPLOAD_GUARD_JS = """
const kinds = { "left-portrait": "image", "right-portrait": "image", "scene-image": "image",
                "single-image": "image", "audio1": "audio", "audio2": "audio" };
const accepted = (kind, file) => (file.type || "").startsWith(kind + "/");
const report = (id, file) => trigger("upload", { id, name: file.name, type: file.type || "" });
const guard = (event, files, target) => {
  const root = target && target.closest && target.closest(Object.keys(kinds).map((k) => "#" + k).join(","));
  if (!root || !files || !files.length) return;
  const bad = [...files].find((f) => !accepted(kinds[root.id], f));
  if (!bad) return;
  event.stopImmediatePropagation();
  event.preventDefault();
  if (target.tagName === "INPUT") target.value = "";
  report(root.id, bad);
};
if (!window.__dvUploadGuard) {
  window.__dvUploadGuard = true;
  document.addEventListener("change", (e) => {
    if (e.target && e.target.type === "file") guard(e, e.target.files, e.target);
  }, true);
  document.addEventListener("drop", (e) => guard(e, e.dataTransfer && e.dataTransfer.files, e.target), true);
}
"""
