// The playground: one prompt, up to three models the key may use, answers streamed side
// by side through the gateway's own /v1 API (the same requests any client sends).

import { authHeaders, clear, errorBox, h } from "./dom.js";

const SLOTS = 3;

// Every model the key may use, as /v1/models lists it: the base, each version, each alias.
function modelChoices(cards) {
  const choices = [];
  for (const card of cards) {
    if (card.kind === "base") {
      choices.push({ value: card.id, label: `${card.id} (base)` });
      continue;
    }
    choices.push({ value: card.id, label: card.id });
    for (const alias of card.aliases || []) {
      choices.push({ value: `${card.name}:${alias}`, label: `${card.name}:${alias} (-> ${card.version})` });
    }
  }
  return choices;
}

async function models() {
  const response = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error((body && body.error && body.error.message) || response.statusText);
  return body.data;
}

// Stream one answer into ``panel``; resolves when it has ended, however it ended.
async function streamInto(panel, request, signal) {
  const answer = panel.querySelector(".answer");
  const stats = panel.querySelector(".stats");
  const started = performance.now();
  let first = null;
  let tokens = null;
  let finish = null;
  const chat = request.mode === "chat";
  const body = {
    model: request.model,
    max_tokens: request.maxTokens,
    temperature: request.temperature,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (chat) body.messages = [{ role: "user", content: request.prompt }];
  else body.prompt = request.prompt;
  try {
    const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => null);
      throw new Error((error && error.error && error.error.message) || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      const events = pending.split("\n\n");
      pending = events.pop();
      for (const event of events) {
        const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const text = chat ? choice.delta && choice.delta.content : choice.text;
          if (text) {
            if (first === null) first = performance.now();
            answer.textContent += text;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        const elapsed = (performance.now() - (first ?? started)) / 1000;
        if (tokens !== null && elapsed > 0) stats.textContent = describe(tokens, elapsed, first, started, finish);
      }
    }
    const elapsed = (performance.now() - (first ?? started)) / 1000;
    stats.textContent = describe(tokens ?? 0, elapsed, first, started, finish);
    panel.dataset.done = "ok";
  } catch (error) {
    panel.append(errorBox(error));
    panel.dataset.done = "error";
  }
}

function describe(tokens, elapsed, first, started, finish) {
  const rate = elapsed > 0 && tokens > 1 ? ((tokens - 1) / elapsed).toFixed(1) : "-";
  const ttft = first !== null ? `${Math.round(first - started)} ms to first token` : "no tokens";
  return `${tokens} tokens · ${rate} tok/s · ${ttft}${finish ? ` · ${finish}` : ""}`;
}

export function showPlayground(main, info) {
  const selects = [];
  const output = h("div", { class: "panels", id: "panels" });
  const prompt = h("textarea", { id: "prompt", rows: 4, placeholder: "Ask something..." }, "Write one sentence about adapters.");
  const mode = h("select", { id: "mode", "aria-label": "mode" }, h("option", { value: "chat" }, "chat"), h("option", { value: "completion" }, "completion"));
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 64 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const run = h("button", { id: "run", type: "button" }, "Run");
  const pickers = h("div", { class: "pickers" });
  let controller = null;
  main.append(
    h("h1", {}, "Playground"),
    h("p", { class: "muted" }, "Up to three models this key may use, answered side by side through this gateway's /v1 API."),
    pickers,
    h("div", { class: "controls" }, h("label", {}, "Mode ", mode), h("label", {}, "Max tokens ", maxTokens), h("label", {}, "Temperature ", temperature), run),
    prompt,
    output,
  );

  models().then(
    (cards) => {
      const choices = modelChoices(cards);
      const adapters = choices.filter((c) => !c.label.endsWith("(base)") && !c.label.includes("(->"));
      for (let i = 0; i < SLOTS; i++) {
        const preset = i < 2 ? (adapters[i] || choices[i] || {}).value : "";
        const select = h(
          "select",
          { id: `model-${i}`, "aria-label": `model ${i + 1}` },
          h("option", { value: "" }, "(none)"),
          choices.map((c) => h("option", { value: c.value, selected: c.value === preset }, c.label)),
        );
        selects.push(select);
        pickers.append(select);
      }
      main.dataset.loaded = "playground";
    },
    (error) => main.append(errorBox(error)),
  );

  run.addEventListener("click", async () => {
    if (controller) controller.abort();
    controller = new AbortController();
    const chosen = selects.map((select) => select.value).filter(Boolean);
    clear(output);
    const request = {
      mode: mode.value,
      prompt: prompt.value,
      maxTokens: Number(maxTokens.value) || 64,
      temperature: Number(temperature.value) || 0,
    };
    const panels = chosen.map((model) =>
      h("div", { class: "panel card", dataset: { model } }, h("h3", { class: "model" }, model), h("pre", { class: "answer" }), h("p", { class: "stats muted" }, "waiting...")),
    );
    output.append(...panels);
    output.dataset.done = "";
    await Promise.all(panels.map((panel, i) => streamInto(panel, { ...request, model: chosen[i] }, controller.signal)));
    output.dataset.done = "all";
  });

  return () => {
    if (controller) controller.abort();
  };
}
