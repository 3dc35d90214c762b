// The gallery: the server's on-disk history (GET /history), or this page's images when the server keeps none.
"use strict";

function describe(p) {
  const parts = [p.prompt, `seed ${p.seed}`, p.size, `${p.num_inference_steps} steps`];
  if (p.mode && p.mode !== "text-to-image") parts.push(p.mode);
  if (p.strength != null && p.mode !== "text-to-image") parts.push(`strength ${p.strength}`);
  if (p.guidance_scale) parts.push(`guidance ${p.guidance_scale}`);
  if (p.negative_prompt) parts.push(`negative: ${p.negative_prompt}`);
  if (p.control_type) parts.push(`control ${p.control_type} × ${p.controlnet_conditioning_scale}`);
  const loras = Object.entries(p.loras || {}).filter(([, w]) => w);
  if (loras.length) parts.push("LoRA " + loras.map(([n, w]) => `${n} ${w}`).join(", "));
  if (p.revised_prompt) parts.push(`enhanced: ${p.revised_prompt}`);
  return parts.join(" · ");
}

function button(text, cls, onclick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = text; b.className = cls; b.onclick = onclick;
  return b;
}

// entry: {id (null when the server keeps no history), url, params}; actions: {reuse, useAsInput}.
async function galleryItem(entry, actions) {
  const item = document.createElement("div");
  item.className = "item";
  if (entry.id) item.dataset.id = entry.id;
  const img = document.createElement("img");
  img.alt = entry.params.prompt;
  img.src = await api.imageURL(entry.url);
  const params = document.createElement("div");
  params.className = "params";
  params.textContent = describe(entry.params);
  const link = document.createElement("a");
  link.href = img.src; link.download = `zimage-${entry.params.seed}.png`; link.textContent = "download";
  const bar = document.createElement("div");
  bar.className = "actions";
  bar.append(button("reuse settings", "reuse", () => actions.reuse(entry.params)),
             button("use as input", "use-input", () => actions.useAsInput(img.src, entry.params)), link);
  if (entry.id) {
    bar.append(button("delete", "delete", async () => {
      try {
        await api.del(`/history/${entry.id}`);
        item.remove();
      } catch (e) { actions.error(e.message); }
    }));
  }
  item.append(img, params, bar);
  return item;
}

async function loadHistory(actions) {
  const gallery = $("gallery");
  if (!info.history || !info.history.enabled) {
    $("history-note").textContent = "(this server keeps none: images stay until the page is reloaded)";
    return;
  }
  $("history-note").textContent = `(kept by the server: the last ${info.history.max_items})`;
  const list = await api.get("/history");
  const items = await Promise.all(list.data.map((e) => galleryItem(e, actions)));
  gallery.replaceChildren(...items);
}
