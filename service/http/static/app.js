// Digit recognizer page: draw or drop a digit, POST it to the API, show what the model answered.
// Plain JS, no dependencies: the page must work offline and under a strict Content-Security-Policy.
"use strict";

(() => {
  // Relative to /ui/, so the page also works when a proxy serves the whole service under a path prefix.
  const API = { predict: "../predict", read: "../read", model: "../model" };
  const DEBOUNCE_MS = 350; // long enough to finish a multi-stroke digit such as 4 or 7 before predicting
  const PAPER = {
    dark: { background: "#000000", ink: "#ffffff" },
    light: { background: "#ffffff", ink: "#000000" },
  };

  const $ = (id) => document.getElementById(id);
  const canvas = $("pad");
  const ctx = canvas.getContext("2d");
  const padWrap = $("pad-wrap");
  const hint = $("pad-hint");
  const fileInput = $("file");
  const modelSelect = $("model");
  const ui = {
    status: $("status"),
    error: $("error"),
    errorText: $("error-text"),
    empty: $("empty"),
    result: $("result"),
    digit: $("digit"),
    verdict: $("verdict"),
    confidence: $("confidence"),
    modelLine: $("model-line"),
    seen: $("seen"),
    bars: $("bars"),
    barsTitle: $("bars-title"),
    number: $("number-digits"),
    boxes: $("boxes"),
  };

  let paper = "dark";
  let currentFile = null; // the picked or dropped file the canvas previews; null while drawing
  let stroke = null; // {pointerId, x, y} while a pointer is drawing
  let debounceTimer = 0;
  let requestSeq = 0; // only the newest request may update the page
  let inFlight = null; // AbortController of the pending request

  // ---- Drawing -------------------------------------------------------------------------------------------

  // MNIST strokes are about 2-3 px wide on a 28 px digit; scaled to the 280 px canvas that is 20-24 px.
  const lineWidth = () => canvas.width * 0.08;

  function resetCanvas() {
    ctx.fillStyle = PAPER[paper].background;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    currentFile = null;
    hint.hidden = false;
    ui.boxes.replaceChildren();
  }

  function canvasPoint(event) {
    const rect = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) / rect.width) * canvas.width,
      y: ((event.clientY - rect.top) / rect.height) * canvas.height,
    };
  }

  function segment(from, to) {
    ctx.strokeStyle = PAPER[paper].ink;
    ctx.lineWidth = lineWidth();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (stroke || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    clearTimeout(debounceTimer);
    if (currentFile) resetCanvas();
    hint.hidden = true;
    ui.boxes.replaceChildren(); // the boxes belonged to the last answer

    const point = canvasPoint(event);
    stroke = { pointerId: event.pointerId, ...point };
    segment(point, point); // a tap leaves a dot
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!stroke || event.pointerId !== stroke.pointerId) return;
    event.preventDefault();
    // Coalesced events keep fast strokes smooth on high-rate pens and touch screens.
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) {
      const point = canvasPoint(e);
      segment(stroke, point);
      stroke.x = point.x;
      stroke.y = point.y;
    }
  });

  function endStroke(event) {
    if (!stroke || event.pointerId !== stroke.pointerId) return;
    stroke = null;
    clearTimeout(debounceTimer);
    debounceTimer = setTimeout(predictCanvas, DEBOUNCE_MS);
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);

  function predictCanvas() {
    // Send exactly what the canvas shows; the service finds the polarity and centres the digit itself.
    canvas.toBlob((blob) => {
      if (blob) predict(blob, "drawing.png");
    }, "image/png");
  }

  function clearAll() {
    clearTimeout(debounceTimer);
    requestSeq += 1; // drop any answer still on its way
    if (inFlight) inFlight.abort();
    resetCanvas();
    fileInput.value = "";
    setBusy(false);
    ui.error.hidden = true;
    ui.result.hidden = true;
    ui.empty.hidden = false;
  }
  $("clear").addEventListener("click", clearAll);

  for (const button of document.querySelectorAll("[data-paper]")) {
    button.addEventListener("click", () => {
      paper = button.dataset.paper;
      for (const b of document.querySelectorAll("[data-paper]")) {
        b.setAttribute("aria-pressed", String(b === button));
      }
      padWrap.dataset.paper = paper;
      clearAll();
    });
  }

  // ---- Files: pick or drop -------------------------------------------------------------------------------

  async function showFilePreview(file) {
    resetCanvas();
    currentFile = file;
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      bitmap.close();
      hint.hidden = true;
    } catch {
      // Not an image the browser can decode; the service will say what is wrong with it.
    }
  }

  function handleFile(file) {
    if (!file) return;
    clearTimeout(debounceTimer);
    showFilePreview(file);
    predict(file, file.name || "upload");
  }

  fileInput.addEventListener("change", () => handleFile(fileInput.files[0]));

  // The whole window accepts drops, so a near miss does not make the browser navigate away to the file.
  let dragDepth = 0;
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth += 1;
    padWrap.classList.add("dragging");
  });
  window.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) padWrap.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    padWrap.classList.remove("dragging");
    handleFile(event.dataTransfer?.files?.[0]);
  });

  // ---- Talking to the API --------------------------------------------------------------------------------

  function setBusy(busy) {
    ui.result.classList.toggle("stale", busy);
    ui.status.textContent = busy ? "Classifying…" : ui.status.dataset.last || "";
    ui.status.classList.toggle("busy", busy);
  }

  async function readBody(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }

  function errorMessage(response, body) {
    // The API answers 4xx with {"error": "..."}; anything else (a proxy page, a framework error) still gets
    // turned into words rather than a silent failure.
    if (body && typeof body === "object") {
      if (typeof body.error === "string") return body.error;
      if (typeof body.detail === "string") return body.detail;
      if (typeof body.message === "string") return body.message;
    }
    const reason = response.statusText ? ` ${response.statusText}` : "";
    return `The service answered HTTP ${response.status}${reason}.`;
  }

  async function predict(blob, filename) {
    const seq = ++requestSeq;
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;

    const form = new FormData();
    form.append("image", blob, filename);
    form.append("return_image", "true");
    if (modelSelect.value) form.append("model", modelSelect.value);

    setBusy(true);
    const started = performance.now();
    try {
      const response = await fetch(API.predict, { method: "POST", body: form, signal: controller.signal });
      const body = await readBody(response);
      if (seq !== requestSeq) return;
      // Several digits side by side: /predict says so (422) and points to /read, which reads the number.
      if (response.status === 422 && typeof body?.error === "string" && body.error.includes("/read")) {
        const read = await fetch(API.read, { method: "POST", body: form, signal: controller.signal });
        const number = await readBody(read);
        if (seq !== requestSeq) return;
        if (!read.ok) throw new Error(errorMessage(read, number));
        if (!number || typeof number.text !== "string" || !Array.isArray(number.digits)) {
          throw new Error("The service sent an answer this page does not understand.");
        }
        showNumber(number, performance.now() - started);
        return;
      }
      if (!response.ok) throw new Error(errorMessage(response, body));
      if (!body || !Array.isArray(body.probabilities) || body.probabilities.length !== 10) {
        throw new Error("The service sent an answer this page does not understand.");
      }
      showResult(body, performance.now() - started);
    } catch (error) {
      if (error.name === "AbortError" || seq !== requestSeq) return;
      const message = error instanceof TypeError ? "Could not reach the service. Is it running?" : error.message;
      showError(message);
    } finally {
      if (seq === requestSeq) {
        inFlight = null;
        setBusy(false);
      }
    }
  }

  function showError(message) {
    ui.errorText.textContent = message;
    ui.error.hidden = false;
    ui.result.hidden = true;
    ui.empty.hidden = true;
    ui.status.dataset.last = "";
  }

  const percent = (p) => `${(p * 100).toFixed(p >= 0.9995 || p < 0.0005 ? 0 : 1)}%`;

  function buildBars() {
    for (let digit = 0; digit < 10; digit += 1) {
      const item = document.createElement("li");
      item.dataset.digit = String(digit);
      item.innerHTML =
        '<span class="bar-label"></span><span class="bar-track"><span class="bar-fill"></span></span>' +
        '<span class="bar-value"></span>';
      item.querySelector(".bar-label").textContent = String(digit);
      ui.bars.append(item);
    }
  }

  // The answer's `status` in words (docs/api.md); the digit is shown greyed or crossed out to match.
  const VERDICTS = {
    ok: (digit) => `This is a ${digit}.`,
    uncertain: (digit) => `Not sure: maybe a ${digit}.`,
    not_a_digit: () => "This does not look like a digit.",
  };

  function showNumber(body, elapsedMs) {
    // A number read by /read: the text in the digit tile, each digit's confidence in words, boxes on the drawing.
    ui.digit.textContent = body.text.replace(/\n/g, " ");
    ui.digit.classList.add("number");
    ui.digit.classList.remove("not-a-digit", "uncertain");
    const doubtful = body.digits.filter((d) => d.status !== "ok").length;
    ui.verdict.dataset.status = doubtful ? "uncertain" : "ok";
    ui.verdict.textContent = `This reads as ${body.text.replace(/\n/g, " ")}` + (doubtful ? ` (${doubtful} digit${doubtful > 1 ? "s" : ""} uncertain).` : ".");
    const least = Math.min(...body.digits.map((d) => Number(d.confidence) || 0));
    ui.confidence.textContent = `${body.digits.length} digits, lowest ${percent(least)}`;
    ui.modelLine.textContent = [body.model, body.version].filter(Boolean).join("\n");
    ui.seen.parentElement.hidden = true;
    ui.bars.hidden = ui.barsTitle.hidden = true;
    ui.number.replaceChildren(
      ...body.digits.map((d) => {
        const item = document.createElement("li");
        item.dataset.status = d.status;
        item.textContent = `${d.digit} · ${percent(d.confidence)}`;
        item.title = VERDICTS[d.status] ? VERDICTS[d.status](d.digit) : "";
        return item;
      }),
    );
    ui.number.hidden = false;
    // Boxes are in the upload's pixels; on a drawing those are the canvas's (a previewed file is scaled).
    ui.boxes.replaceChildren();
    if (!currentFile) {
      for (const d of body.digits) {
        const [x, y, w, h] = d.box;
        const box = document.createElement("div");
        box.className = "box";
        box.dataset.status = d.status;
        Object.assign(box.style, {
          left: `${(x / canvas.width) * 100}%`,
          top: `${(y / canvas.height) * 100}%`,
          width: `${(w / canvas.width) * 100}%`,
          height: `${(h / canvas.height) * 100}%`,
        });
        const label = document.createElement("span");
        label.textContent = `${d.digit} ${percent(d.confidence)}`;
        box.append(label);
        ui.boxes.append(box);
      }
    }
    ui.status.dataset.last = `${Math.round(elapsedMs)} ms`;
    ui.error.hidden = true;
    ui.empty.hidden = true;
    ui.result.hidden = false;
  }

  function showResult(body, elapsedMs) {
    ui.digit.classList.remove("number");
    ui.bars.hidden = ui.barsTitle.hidden = false;
    ui.number.hidden = true;
    ui.boxes.replaceChildren();
    const probabilities = body.probabilities;
    const status = Object.hasOwn(VERDICTS, body.status) ? body.status : "";
    ui.digit.textContent = status === "not_a_digit" ? "?" : String(body.digit);
    ui.digit.classList.toggle("not-a-digit", status === "not_a_digit");
    ui.digit.classList.toggle("uncertain", status === "uncertain");
    ui.verdict.dataset.status = status;
    ui.verdict.textContent = status ? VERDICTS[status](body.digit) : "";
    ui.confidence.textContent = percent(body.confidence);
    ui.modelLine.textContent = [body.model, body.version].filter(Boolean).join("\n");
    ui.modelLine.title = ui.modelLine.textContent;
    if (body.image) {
      ui.seen.src = `data:image/png;base64,${body.image}`;
      ui.seen.parentElement.hidden = false;
    } else {
      ui.seen.parentElement.hidden = true;
    }
    ui.bars.querySelectorAll("li").forEach((item, digit) => {
      const p = Number(probabilities[digit]) || 0;
      item.classList.toggle("top", digit === body.digit);
      item.querySelector(".bar-fill").style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      item.querySelector(".bar-value").textContent = percent(p);
      item.title = `${digit}: ${(p * 100).toFixed(2)}%`;
    });
    ui.status.dataset.last = `${Math.round(elapsedMs)} ms`;
    ui.error.hidden = true;
    ui.empty.hidden = true;
    ui.result.hidden = false;
  }

  // ---- Model picker --------------------------------------------------------------------------------------

  function modelNames(card) {
    // GET /model lists every loaded model; accept a list, {"models": [...]} or a single card.
    const list = Array.isArray(card) ? card : Array.isArray(card?.models) ? card.models : card ? [card] : [];
    return list
      .map((m) => (typeof m === "string" ? { name: m } : { ...m, name: m.name || m.model_name }))
      .filter((m) => typeof m.name === "string" && m.name);
  }

  async function loadModels() {
    try {
      const response = await fetch(API.model);
      if (!response.ok) return;
      const card = await response.json();
      const models = modelNames(card);
      const preferred = card?.default || models[0]?.name;
      for (const model of models) {
        const option = new Option(model.name, model.name);
        option.selected = model.name === preferred;
        const accuracy = typeof model.test_accuracy === "number" ? `, ${(model.test_accuracy * 100).toFixed(2)}% on MNIST test` : "";
        option.title = `${model.name}${model.version ? ` (${model.version})` : ""}${accuracy}`;
        modelSelect.append(option);
      }
      $("model-picker").hidden = models.length === 0;
      modelSelect.disabled = models.length < 2;
    } catch {
      // Without the list the page still works: the service uses its default model.
    }
  }

  modelSelect.addEventListener("change", () => {
    if (!ui.result.hidden || !ui.error.hidden) {
      if (currentFile) predict(currentFile, currentFile.name || "upload");
      else predictCanvas();
    }
  });

  buildBars();
  resetCanvas();
  loadModels();
})();
