// The input image (image-to-image, inpainting) and the inpainting mask painted on it with a brush.
// The mask is sent as OpenAI's mask: a PNG of the image's size, transparent (alpha 0) where the image is repainted.
"use strict";

const input = {
  blob: null, name: "", width: 0, height: 0,   // the image as uploaded
  painting: false, last: null,
};

function mb(bytes) { return (bytes / 2 ** 20).toFixed(1) + " MB"; }

// A file checked before anything is sent: an image, under the server's body limit. Throws with a one-line message.
async function checkImageFile(file, maxBytes) {
  const name = file.name || "the file";
  if (maxBytes && file.size > maxBytes) {
    throw new Error(`'${name}' is ${mb(file.size)}: the server takes at most ${mb(maxBytes)} per request`);
  }
  if (file.type && !file.type.startsWith("image/")) throw new Error(`'${name}' is not an image (${file.type})`);
  try {
    return await createImageBitmap(file);
  } catch (e) {
    throw new Error(`'${name}' is not an image this browser can read (PNG, JPEG, WebP)`);
  }
}

async function setInputImage(file, maxBytes) {
  const bitmap = await checkImageFile(file, maxBytes);
  Object.assign(input, { blob: file, name: file.name || "image", width: bitmap.width, height: bitmap.height });
  for (const id of ["input-canvas", "mask-canvas"]) {
    $(id).width = bitmap.width;
    $(id).height = bitmap.height;
  }
  $("input-canvas").getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  clearMask();
  $("canvas-stack").hidden = false;
  $("drop-hint").hidden = true;
  $("input-info").textContent = `${input.name} · ${input.width}×${input.height} (drop another image here to replace it)`;
}

function maskContext() { return $("mask-canvas").getContext("2d", { willReadFrequently: true }); }

function clearMask() { maskContext().clearRect(0, 0, $("mask-canvas").width, $("mask-canvas").height); }

// The brush in screen pixels (what the user sees), converted to image pixels.
function canvasPoint(e) {
  const c = $("mask-canvas"), r = c.getBoundingClientRect();
  const scale = c.width / r.width;
  return { x: (e.clientX - r.left) * scale, y: (e.clientY - r.top) * scale, scale };
}

function stroke(from, to) {
  const ctx = maskContext();
  ctx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = "#ff3b30";
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.lineWidth = +$("brush-size").value * to.scale;
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x + 0.01, to.y);
  ctx.stroke();
}

function invertMask() {
  const c = $("mask-canvas"), ctx = maskContext();
  const img = ctx.getImageData(0, 0, c.width, c.height), d = img.data;
  for (let i = 0; i < d.length; i += 4) {
    const painted = d[i + 3] >= 128;
    d[i] = 255; d[i + 1] = 59; d[i + 2] = 48; d[i + 3] = painted ? 0 : 255;
  }
  ctx.globalCompositeOperation = "source-over";
  ctx.putImageData(img, 0, 0);
}

// [painted pixels, the OpenAI mask as a PNG Blob]: alpha 0 where painted (half-covered brush edges count), else 255.
async function maskBlob() {
  const c = $("mask-canvas");
  const src = maskContext().getImageData(0, 0, c.width, c.height).data;
  const out = document.createElement("canvas");
  out.width = c.width; out.height = c.height;
  const octx = out.getContext("2d");
  const img = octx.createImageData(c.width, c.height), d = img.data;
  let painted = 0;
  for (let i = 0; i < d.length; i += 4) {
    const edit = src[i + 3] >= 128;
    painted += edit;
    d[i] = d[i + 1] = d[i + 2] = 0;
    d[i + 3] = edit ? 0 : 255;
  }
  octx.putImageData(img, 0, 0);
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  return [painted, blob];
}

function setupMask(onError) {
  const c = $("mask-canvas");
  c.addEventListener("pointerdown", (e) => {
    if ($("mask-tools").hidden) return;
    c.setPointerCapture(e.pointerId);
    input.painting = true;
    input.last = canvasPoint(e);
    stroke(input.last, input.last);
  });
  c.addEventListener("pointermove", (e) => {
    if (!input.painting) return;
    const p = canvasPoint(e);
    stroke(input.last, p);
    input.last = p;
  });
  for (const ev of ["pointerup", "pointercancel"]) c.addEventListener(ev, () => { input.painting = false; });
  $("brush-size").oninput = () => { $("brush-out").textContent = $("brush-size").value; };
  $("mask-clear").onclick = clearMask;
  $("mask-invert").onclick = invertMask;

  const pick = (file) => { if (file) setInputImage(file, info.max_body).catch((e) => onError(e.message)); };
  $("input-file").onchange = () => { pick($("input-file").files[0]); $("input-file").value = ""; };
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    pick(e.dataTransfer.files[0]);
  });
}
