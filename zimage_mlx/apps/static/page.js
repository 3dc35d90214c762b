// The page: the form (modes, model-aware controls, sizes, LoRAs), one generation at a time, live mode, keyboard.
"use strict";
const $ = (id) => document.getElementById(id);
const LIVE_SIDE = 256, LIVE_STEPS = 4, DEBOUNCE_MS = 350;
const ASPECTS = ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"];
const SIDES = [256, 512, 768, 1024, 1280, 1536, 2048];
// What the page assumes until /info answers (a Turbo model, the server's defaults).
let info = { model: "", variant: "turbo", size_multiple: 16, max_side: 4096, max_pixels: 2048 * 2048, max_body: 0,
             max_n: 10, max_steps: 200, loras: [], controlnet: null, history: { enabled: false }, enhance: false,
             defaults: { num_inference_steps: 8, guidance_scale: 0, strength: 0.6, inpaint_strength: 1,
                         size: 1024, controlnet_conditioning_scale: 0.75 } };
let current = null;                               // the running job: {controller, live}
let liveSeed = Math.floor(Math.random() * 2 ** 31);
let timer = null;
let control = null;                               // the ControlNet condition image (a File)

function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
function mode() { return document.querySelector("input[name=mode]:checked").value; }
function setMode(m) { document.querySelector(`input[name=mode][value=${m}]`).checked = true; modeChanged(); }

// ----------------------------------------------------------------------------------------- sizes
function snap(x) { const m = info.size_multiple; return Math.max(m, Math.round(x / m) * m); }

function presetSize() {
  const a = $("aspect").value;
  if (a === "custom") return;
  const [x, y] = a.split(":").map(Number), side = +$("side").value;
  $("width").value = snap(x >= y ? side : side * x / y);
  $("height").value = snap(x >= y ? side * y / x : side);
}

function setSize(w, h) {
  $("width").value = w; $("height").value = h;
  const match = ASPECTS.find((a) => { const [x, y] = a.split(":").map(Number); return Math.abs(w / h - x / y) < 0.02; });
  const side = Math.max(w, h);
  if (match && SIDES.includes(side)) { $("aspect").value = match; $("side").value = side; presetSize(); }
  else $("aspect").value = "custom";
}

// ----------------------------------------------------------------------------------------- the model's controls
function applyInfo() {
  const d = info.defaults;
  $("model").textContent = `${info.model} · Z-Image ${info.variant === "base" ? "Base" : "Turbo"}`;
  $("steps").max = Math.min(info.max_steps, Math.max(50, d.num_inference_steps * 2));
  $("steps").value = d.num_inference_steps;
  $("guidance").value = d.guidance_scale;
  $("advanced").open = info.variant === "base" || d.guidance_scale > 0;   // Turbo runs without guidance
  $("n").max = info.max_n;
  for (const id of ["width", "height"]) { $(id).step = info.size_multiple; $(id).min = info.size_multiple; $(id).max = info.max_side; }
  $("aspect").replaceChildren(...ASPECTS.map((a) => new Option(a, a)), new Option("custom", "custom"));
  $("side").replaceChildren(...SIDES.filter((s) => s <= info.max_side).map((s) => new Option(s, s)));
  $("side").value = SIDES.includes(d.size) ? d.size : 1024;
  presetSize();
  $("mode-control-tab").hidden = !info.controlnet;
  if (info.controlnet) {
    $("control-type").replaceChildren(...info.controlnet.control_types.map((t) => new Option(t, t)));
    $("control-scale").value = d.controlnet_conditioning_scale;
  }
  $("lora-section").hidden = !info.loras.length;
  $("loras").replaceChildren(...info.loras.map(loraRow));
  $("enhance").parentElement.hidden = !info.enhance;
  for (const id of ["steps", "guidance", "control-scale", "strength"]) $(id).dispatchEvent(new Event("input"));
  modeChanged();
}

function loraRow(lora) {
  const row = document.createElement("label");
  const slider = Object.assign(document.createElement("input"),
                               { type: "range", min: -1, max: 2, step: 0.05, value: lora.weight });
  slider.dataset.lora = lora.name;
  const out = document.createElement("output");
  out.textContent = lora.weight;
  slider.oninput = () => { out.textContent = slider.value; };
  row.append(lora.name, slider, out);
  return row;
}

function modeChanged() {
  const m = mode(), edit = m === "img2img" || m === "inpaint";
  $("input-section").hidden = !edit;
  $("mask-tools").hidden = m !== "inpaint";
  $("control-section").hidden = !(m === "control" || (m === "inpaint" && info.controlnet && info.controlnet.inpaint));
  $("control-optional").hidden = m !== "inpaint";
  $("size-row").hidden = $("aspect").parentElement.parentElement.hidden = edit;
  $("strength").value = m === "inpaint" ? info.defaults.inpaint_strength : info.defaults.strength;
  $("strength").dispatchEvent(new Event("input"));
  guidanceChanged();
}

function guidanceChanged() {
  $("guidance-out").textContent = $("guidance").value;
  $("negative-row").hidden = +$("guidance").value <= 0;
}

// ----------------------------------------------------------------------------------------- the request
function loraWeights() {
  const out = {};
  for (const s of document.querySelectorAll("#loras input[data-lora]")) out[s.dataset.lora] = +s.value;
  return Object.keys(out).length ? out : undefined;
}

// {path, body, params}: a JSON body for text-to-image, a form (files) for the other modes.
async function buildRequest(live) {
  const m = mode();
  const prompt = $("prompt").value;
  if (!prompt.trim()) throw new Error(live ? "" : "type a prompt first");
  let steps = +$("steps").value;
  if (live) steps = Math.min(steps, LIVE_STEPS);
  const fields = {
    prompt, num_inference_steps: steps, n: live ? 1 : Math.min(info.max_n, Math.max(1, +$("n").value || 1)),
    stream: true, partial_images: steps, response_format: "b64_json", output_format: "png",
    guidance_scale: +$("guidance").value, loras: loraWeights(), history: !live,
  };
  if (+$("guidance").value > 0 && $("negative").value.trim()) fields.negative_prompt = $("negative").value;
  if ($("enhance").checked && !live) fields.enhance_prompt = true;
  if ($("cache").value) {
    fields.cache = $("cache").value;
    if ($("cache-threshold").value.trim() !== "") fields.cache_threshold = +$("cache-threshold").value;
  }
  const seedText = $("seed").value.trim();
  // With Live on, "Render full size" keeps the live seed, so the full render is the picture being previewed.
  if (seedText !== "") fields.seed = +seedText; else if (live || $("live").checked) fields.seed = liveSeed;
  let w = +$("width").value, h = +$("height").value;
  const files = {};
  if (m === "img2img" || m === "inpaint") {
    if (!input.blob) throw new Error(m === "inpaint" ? "choose an image to paint the mask on first" : "choose an input image first");
    files.image = input.blob;
    [w, h] = [snap(input.width), snap(input.height)];
    if (m === "inpaint") {
      const [painted, blob] = await maskBlob();
      if (!painted) throw new Error("paint the area to repaint on the image first (the brush)");
      files.mask = blob;
    }
  }
  if (m === "control" || (m === "inpaint" && control && !$("control-section").hidden)) {
    if (!control) throw new Error("choose a control image first");
    files.control_image = control;
    fields.control_type = $("control-type").value;
    fields.controlnet_conditioning_scale = +$("control-scale").value;
  } else if (files.image) {
    fields.strength = +$("strength").value;
  }
  if (live) { const s = LIVE_SIDE / Math.max(w, h); [w, h] = [snap(w * s), snap(h * s)]; }
  fields.size = `${w}x${h}`;
  const params = { ...fields, mode: { txt2img: "text-to-image", img2img: "image-to-image", inpaint: "inpaint",
                                      control: "controlnet" }[m] };
  if (!Object.keys(files).length) return { path: "/v1/images/generations", body: fields, params };
  const path = files.image ? "/v1/images/edits" : "/v1/images/generations";
  return { path, body: formBody(fields, files), params };
}

// ----------------------------------------------------------------------------------------- one generation
function showPreview(b64, kind, prompt) {
  const img = $("preview");
  img.src = "data:image/png;base64," + b64;
  img.hidden = false;
  $("placeholder").hidden = true;
  img.dataset.kind = kind;
  img.dataset.prompt = prompt;
  img.dataset.updates = String(+img.dataset.updates + 1);
}

function progress(step, total, t0) {
  const bar = $("progress");
  bar.hidden = false; bar.max = total; bar.value = step;
  const per = (performance.now() - t0) / 1000 / Math.max(step, 1);
  status(`step ${step}/${total} · ${per.toFixed(2)} s/step`);
}

async function start(live) {
  if (current) current.controller.abort();          // the server cancels it at its next step
  let req;
  try {
    req = await buildRequest(live);
  } catch (e) { status(e.message, !!e.message); return; }
  const controller = new AbortController(), job = { controller, live };
  current = job;
  $("cancel").disabled = false;
  status(live ? "live…" : (req.params.enhance_prompt ? "enhancing the prompt…" : "generating…"));
  const t0 = performance.now();
  let done = 0, stepT0 = t0;
  try {
    await api.stream(req.path, req.body, controller.signal, async (ev) => {
      if (ev.type === "image_generation.partial_image") {
        showPreview(ev.b64_json, "partial", req.params.prompt);
        if (ev.num_steps) progress(ev.step, ev.num_steps, stepT0);
      } else if (ev.type === "image_generation.completed") {
        done += 1;
        showPreview(ev.b64_json, "final", req.params.prompt);
        if (ev.revised_prompt) { $("revised").hidden = false; $("revised").textContent = "Enhanced prompt: " + ev.revised_prompt; }
        if (!live) await addResult(ev, req.params);
        status(`${done}/${req.params.n} done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
        stepT0 = performance.now();
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") status(e.message, true);
    else if (current === job) status("cancelled");
  } finally {
    if (current === job) { current = null; $("cancel").disabled = true; $("progress").hidden = true; }
  }
}

const actions = { reuse, useAsInput, error: (msg) => status(msg, true) };

async function addResult(ev, params) {
  const p = { ...params, seed: ev.seed, revised_prompt: ev.revised_prompt };
  const entry = ev.history_id ? { id: ev.history_id, url: `/history/${ev.history_id}.png`, params: p }
                              : { id: null, url: URL.createObjectURL(b64Blob(ev.b64_json)), params: p };
  $("gallery").prepend(await galleryItem(entry, actions));
}

// ----------------------------------------------------------------------------------------- gallery actions
function reuse(p) {
  const modes = { "image-to-image": "img2img", inpaint: "inpaint", controlnet: "control", "controlnet-inpaint": "inpaint" };
  const m = modes[p.mode] || "txt2img";
  setMode(m === "control" && !info.controlnet ? "txt2img" : m);
  $("prompt").value = p.prompt || "";
  $("negative").value = p.negative_prompt || "";
  $("guidance").value = p.guidance_scale || 0;
  $("steps").value = p.num_inference_steps;
  $("seed").value = p.seed;
  if (p.size) setSize(...p.size.split("x").map(Number));
  if (p.strength != null) $("strength").value = p.strength;
  if (p.controlnet_conditioning_scale != null) $("control-scale").value = p.controlnet_conditioning_scale;
  if (p.control_type) $("control-type").value = p.control_type;
  $("cache").value = p.cache || "";
  $("cache-threshold").value = p.cache_threshold == null ? "" : p.cache_threshold;
  const missing = [];
  for (const s of document.querySelectorAll("#loras input[data-lora]")) s.value = 0;
  for (const [name, w] of Object.entries(p.loras || {})) {
    const s = document.querySelector(`#loras input[data-lora="${CSS.escape(name)}"]`);
    if (s) s.value = w; else if (w) missing.push(name);
  }
  for (const id of ["steps", "strength", "control-scale"]) $(id).dispatchEvent(new Event("input"));
  document.querySelectorAll("#loras input").forEach((s) => s.dispatchEvent(new Event("input")));
  guidanceChanged();
  status(missing.length ? `this server has no LoRA ${missing.map((n) => `'${n}'`).join(", ")}: left out` : "settings restored",
         missing.length > 0);
}

async function useAsInput(src, p) {
  try {
    const blob = await (await fetch(src)).blob();
    if (mode() !== "inpaint") setMode("img2img");
    await setInputImage(new File([blob], `zimage-${p.seed}.png`, { type: blob.type }), info.max_body);
    $("prompt").value = p.prompt || $("prompt").value;
    status("input image set");
  } catch (e) { status(e.message, true); }
}

// ----------------------------------------------------------------------------------------- wiring
function liveChange() {
  if (!$("live").checked) return;
  clearTimeout(timer);
  timer = setTimeout(() => start(true), DEBOUNCE_MS);
}

function wire() {
  $("steps").oninput = () => { $("steps-out").textContent = $("steps").value; };
  $("strength").oninput = () => { $("strength-out").textContent = $("strength").value; };
  $("control-scale").oninput = () => { $("control-scale-out").textContent = $("control-scale").value; };
  $("guidance").oninput = guidanceChanged;
  $("aspect").onchange = $("side").onchange = presetSize;
  for (const id of ["width", "height"]) $(id).addEventListener("change", () => { $("aspect").value = "custom"; });
  for (const r of document.querySelectorAll("input[name=mode]")) r.onchange = modeChanged;
  $("control-file").onchange = async () => {
    const file = $("control-file").files[0];
    try {
      await checkImageFile(file, info.max_body);
      control = file;
      $("control-thumb").src = URL.createObjectURL(file);
      $("control-thumb").hidden = false;
    } catch (e) { control = null; $("control-file").value = ""; status(e.message, true); }
  };
  $("form").onsubmit = (e) => { e.preventDefault(); start(false); };
  $("render").onclick = () => start(false);
  $("cancel").onclick = () => { if (current) current.controller.abort(); };
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); start(false); }
  });
  for (const id of ["prompt", "negative", "steps", "width", "height", "seed", "aspect", "side"]) $(id).addEventListener("input", liveChange);
  $("live").onchange = liveChange;
  $("apikey").value = api.key;
  $("apikey").onchange = () => { api.key = $("apikey").value.trim(); localStorage.setItem("zimage-mlx-key", api.key); init(); };
  setupMask((msg) => status(msg, true));
}

async function init() {
  try {
    const health = await api.get("/health");
    $("keyrow").hidden = !health.auth;
    info = await api.get("/info");
    applyInfo();
    await loadHistory(actions);
  } catch (e) {
    applyInfo();
    status(e.status === 401 ? "enter the API key (the server asks for one)" : e.message, true);
  }
}

wire();
init();
