// The chat page of `vlm serve`: pick an image, ask about it, read the answer as it streams in.
// It speaks the server's OpenAI-compatible API: GET /v1/models for the model id, POST /v1/chat/completions with
// stream: true, whose answer is server-sent events ("data: {chunk}" ... "data: [DONE]"). No framework, no build.
"use strict";

const MAX_IMAGE_BYTES = 20 * 1024 * 1024; // a data: URL this big is already a slow request

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"), dropzone: $("dropzone"), imageInput: $("image-input"), previewFigure: $("preview-figure"),
  preview: $("preview"), previewName: $("preview-name"), secondImage: $("second-image"),
  removeImage: $("remove-image"), log: $("log"),
  emptyLog: $("empty-log"), error: $("error"), composer: $("composer"), question: $("question"), send: $("send"),
  stop: $("stop"), reset: $("reset"), apiKey: $("api-key"), settings: $("settings"),
};

const state = {
  messages: [],        // the conversation as the API takes it: {role, content}
  image: null,         // {dataUrl, name}: goes with the next user message
  modelId: null,
  controller: null,    // AbortController of the answer being streamed
};

// ---- errors -------------------------------------------------------------------------------------------------

function showError(text) {
  els.error.textContent = text;
  els.error.hidden = false;
}

function clearError() {
  els.error.textContent = "";
  els.error.hidden = true;
}

// The text of an API error: OpenAI's {"error": {"message", "type", "param", "code"}}, else what came back.
async function errorText(response) {
  const body = await response.text();
  let message = body.trim();
  try {
    const error = JSON.parse(body).error;
    if (error && error.message) {
      message = error.message + (error.param ? ` (parameter: ${error.param})` : "");
    }
  } catch (_) { /* not JSON: show the text as it is */ }
  if (response.status === 401) {
    message += " Enter the server's API key under Settings.";
    els.settings.open = true;
  }
  return `Error ${response.status}: ${message || response.statusText}`;
}

// ---- the API ------------------------------------------------------------------------------------------------

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = els.apiKey.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  const models = (await response.json()).data || [];
  if (!models.length) throw new Error("The server lists no model at /v1/models.");
  state.modelId = models[0].id;
  els.model.textContent = `Model: ${state.modelId}`;
  return state.modelId;
}

// Yields the parsed JSON of each "data:" event of a server-sent-events body until "data: [DONE]".
async function* serverSentEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // Events end with a blank line; the last piece may be an event still arriving.
    const events = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r\n|\n|\r/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
        .join("\n");
      if (!data) continue; // a comment or keep-alive
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
  if (buffer.trim()) throw new Error("The answer stopped in the middle of an event; the server may have failed.");
}

// Streams the assistant's answer to `messages` into `onText(piece)`; returns the whole answer.
async function streamAnswer(messages, onText, signal) {
  const model = state.modelId || await loadModel();
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ model, messages, stream: true }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  let answer = "";
  for await (const chunk of serverSentEvents(response.body, signal)) {
    if (chunk.error) throw new Error(`Error: ${chunk.error.message || JSON.stringify(chunk.error)}`);
    const choice = (chunk.choices || [])[0];
    const piece = choice && choice.delta && choice.delta.content;
    if (piece) {
      answer += piece;
      onText(piece);
    }
  }
  return answer;
}

// ---- the image ----------------------------------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function setImage(file) {
  clearError();
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (its type is "${file.type || "unknown"}"); pick a PNG, JPEG or WebP file.`);
    return;
  }
  if (file.size > MAX_IMAGE_BYTES) {
    showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; pick an image under ` +
              `${MAX_IMAGE_BYTES / 1048576} MB.`);
    return;
  }
  try {
    showImage({ dataUrl: await readAsDataUrl(file), name: file.name });
  } catch (error) {
    showError(`Could not read ${file.name}: ${error.message}`);
  }
}

function showImage(image) {
  state.image = image;
  els.preview.src = image.dataUrl;
  els.preview.alt = `The chosen image, ${image.name}`;
  els.previewName.textContent = image.name;
  els.secondImage.hidden = !state.messages.some((message) => Array.isArray(message.content)
    && message.content.some((part) => part.type === "image_url"));
  els.previewFigure.hidden = false;
}

function clearImage() {
  state.image = null;
  els.imageInput.value = "";
  els.preview.removeAttribute("src");
  els.preview.alt = "";
  els.previewFigure.hidden = true;
}

// ---- the conversation ---------------------------------------------------------------------------------------

function addEntry(role, text, imageUrl) {
  els.emptyLog.hidden = true;
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  item.append(who);
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "The image sent with this message";
    img.className = "thumb";
    item.append(img);
  }
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  els.log.append(item);
  item.scrollIntoView({ block: "end" });
  return { item, body };
}

function setBusy(busy) {
  els.send.disabled = busy;
  els.stop.hidden = !busy;
  els.question.setAttribute("aria-busy", String(busy));
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  const text = els.question.value.trim();
  if (!text && !state.image) {
    showError("Type a message (and pick an image) first.");
    els.question.focus();
    return;
  }
  clearError();
  const image = state.image;
  const shown = text || "Describe the image.";
  // OpenAI's content parts when an image goes along, else the plain string.
  const content = image
    ? [{ type: "text", text: shown }, { type: "image_url", image_url: { url: image.dataUrl } }]
    : shown;
  const question = addEntry("user", shown, image && image.dataUrl);
  state.messages.push({ role: "user", content });
  els.question.value = "";
  clearImage();

  const answer = addEntry("assistant", "");
  answer.item.setAttribute("aria-busy", "true");
  answer.item.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  els.question.focus(); // the Send button it may have come from is disabled until the answer is in
  try {
    const reply = await streamAnswer(state.messages, (piece) => {
      answer.body.textContent += piece;
      answer.item.scrollIntoView({ block: "end" });
    }, controller.signal);
    if (state.controller === controller) {
      if (controller.signal.aborted) answer.body.textContent += " [stopped]";
      state.messages.push({ role: "assistant", content: reply });
    }
  } catch (error) {
    if (state.controller !== controller) return; // reset while streaming: that conversation is gone
    if (error.name === "AbortError" || controller.signal.aborted) {
      answer.body.textContent += " [stopped]";
      state.messages.push({ role: "assistant", content: answer.body.textContent.replace(/ \[stopped\]$/, "") });
    } else {
      // No answer: the question leaves the conversation and goes back into the form (with its image), so that
      // it can be sent again once the problem is fixed.
      state.messages.pop();
      question.item.remove();
      answer.item.remove();
      if (!state.messages.length) els.emptyLog.hidden = false;
      els.question.value = text;
      if (image) showImage(image);
      showError(error instanceof TypeError ? `Could not reach the server (${error.message}).` : error.message);
    }
  } finally {
    answer.item.setAttribute("aria-busy", "false");
    answer.item.classList.remove("streaming");
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
  }
}

function reset() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.messages = [];
  for (const item of [...els.log.querySelectorAll(".message")]) item.remove();
  els.emptyLog.hidden = false;
  clearImage();
  clearError();
  setBusy(false);
  els.question.value = "";
  els.question.focus();
}

// ---- wiring -------------------------------------------------------------------------------------------------

els.imageInput.addEventListener("change", () => setImage(els.imageInput.files[0]));
els.removeImage.addEventListener("click", clearImage);
for (const name of ["dragenter", "dragover"]) {
  els.dropzone.addEventListener(name, (event) => {
    event.preventDefault();
    els.dropzone.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  els.dropzone.addEventListener(name, () => els.dropzone.classList.remove("dragging"));
}
els.dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  setImage(event.dataTransfer.files[0]);
});
els.composer.addEventListener("submit", send);
els.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    els.composer.requestSubmit();
    event.preventDefault();
  }
});
els.stop.addEventListener("click", () => state.controller && state.controller.abort());
els.reset.addEventListener("click", reset);

els.apiKey.value = sessionStorage.getItem("vlm-api-key") || "";
els.apiKey.addEventListener("change", () => {
  sessionStorage.setItem("vlm-api-key", els.apiKey.value.trim());
  clearError();
  loadModel().catch((error) => showError(error.message));
});

loadModel().catch((error) => {
  els.model.textContent = "Model: unknown (see the error below)";
  showError(error instanceof TypeError ? `Could not reach the server (${error.message}).` : error.message);
});
