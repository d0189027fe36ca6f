// One run on the page: a row of agent cards per layer, the answer, a summary and a timeline.
// It is driven by the events of POST /v1/moa/runs (live, or replayed from local storage), so
// what the page shows after a reload is what it showed when the run ended.

import { renderMarkdown } from "./markdown.js";

function el(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
}

const number = new Intl.NumberFormat("en");

// The status a finished agent shows: done / failed / cut (and "empty", a kind of failure).
const FINISHED = {
  ok: ["done", "done"],
  truncated: ["cut", "cut: max tokens"],
  cancelled: ["cut", "cut"],
  failed: ["failed", "failed"],
  empty: ["failed", "empty"],
};

class Card {
  constructor(layer, index, agent, aggregator) {
    this.layer = layer;
    this.index = index;
    this.text = "";
    this.start = null;
    this.first = null;
    this.end = null;
    this.result = null;
    this.node = el("div", "card");
    this.node.dataset.layer = String(layer);
    this.node.dataset.index = String(index);
    const head = el("div", "card-head");
    this.title = el("span", "card-model", agent.model);
    this.title.title = `${agent.provider}/${agent.model}`;
    this.badge = el("span", "badge");
    head.append(this.title, this.badge);
    this.meta = el("div", "card-meta");
    this.body = el("div", "card-body md");
    this.error = el("div", "card-error");
    this.error.hidden = true;
    this.more = el("button", "card-more", "expand");
    this.more.type = "button";
    this.more.addEventListener("click", () => {
      const open = this.node.classList.toggle("expanded");
      this.more.textContent = open ? "collapse" : "expand";
    });
    this.node.append(head, this.meta, this.body, this.error, this.more);
    this.provider = agent.provider;
    this.model = agent.model;
    this.aggregator = aggregator;
    this.setStatus("waiting", "waiting");
  }

  setStatus(status, label) {
    this.status = status;
    this.node.dataset.status = status;
    this.badge.textContent = label;
  }

  showMeta(now) {
    const parts = [this.provider];
    if (this.result) {
      parts.push(seconds(this.result.latency_s));
      const tokens = this.result.usage?.completion_tokens;
      if (tokens) parts.push(`${number.format(tokens)} tok`);
      if (this.result.attempts > 1) parts.push(`${this.result.attempts} attempts`);
    } else if (this.start !== null && now !== undefined) {
      parts.push(seconds(Math.max(0, now - this.start)));
    }
    this.meta.textContent = parts.join(" · ");
  }
}

export class RunView {
  /** `actions`: {copy(), regenerate()} for the buttons under the answer. */
  constructor(actions) {
    this.cards = new Map();
    this.answer = "";
    this.finished = false;
    this.result = null;
    this.total = null;
    this.clock = null; // performance.now() at the server's t = 0, for live timers
    this.node = el("section", "run");
    this.layers = el("details", "layers");
    this.layers.open = true;
    this.layersSummary = el("summary", "", "Agents");
    this.layers.append(this.layersSummary);
    this.rows = el("div", "rows");
    this.layers.append(this.rows);
    this.answerNode = el("div", "answer md");
    this.errorNode = el("div", "run-error");
    this.errorNode.setAttribute("role", "alert");
    this.errorNode.hidden = true;
    this.summary = el("div", "summary");
    this.timeline = el("details", "timeline");
    this.timeline.append(el("summary", "", "Timeline"));
    this.waterfall = el("div", "waterfall");
    this.timeline.append(this.waterfall);
    this.timeline.hidden = true;
    const bar = el("div", "actions");
    this.copyButton = el("button", "copy", "Copy answer");
    this.copyButton.type = "button";
    this.copyButton.addEventListener("click", () => actions.copy(this));
    this.regenerateButton = el("button", "regenerate", "Regenerate");
    this.regenerateButton.type = "button";
    this.regenerateButton.addEventListener("click", () => actions.regenerate(this));
    bar.append(this.copyButton, this.regenerateButton);
    this.actions = bar;
    bar.hidden = true;
    this.node.append(this.layers, this.answerNode, this.errorNode, this.summary, this.timeline, bar);
    this.pending = new Set();
    this.frame = null;
  }

  row(layer, title) {
    let row = this.rows.querySelector(`[data-layer="${layer}"]`);
    if (!row) {
      row = el("div", "layer");
      row.dataset.layer = String(layer);
      row.append(el("h3", "", title), el("div", "cards"));
      this.rows.append(row);
    }
    return row.querySelector(".cards");
  }

  card(layer, index, agent, aggregator = false) {
    const key = `${layer}:${index}`;
    let card = this.cards.get(key);
    if (!card) {
      card = new Card(layer, index, agent, aggregator);
      this.cards.set(key, card);
      const title = aggregator ? "Aggregator" : `Layer ${layer}`;
      this.row(layer, title).append(card.node);
    }
    return card;
  }

  /** Apply one event of the stream. */
  apply(event) {
    const handler = this[`on_${event.type}`];
    if (handler) handler.call(this, event);
  }

  on_run_started(event) {
    this.clock = performance.now() - event.t * 1000;
    this.shape = event;
    event.layers.forEach((agents, i) => {
      agents.forEach((agent, j) => this.card(i + 1, j, agent));
    });
    this.card(event.layers.length + 1, 0, event.aggregator, true);
    // aggregator_calls: 0 when the final answer is chosen among the candidates, null when it
    // depends on the run (staircase steps).
    const proposerCalls = event.layers.reduce((n, agents) => n + agents.length, 0);
    const calls =
      event.aggregator_calls === null
        ? `${proposerCalls} calls + the aggregator's steps`
        : `${proposerCalls + event.aggregator_calls} calls`;
    this.layersSummary.textContent = `Agents · ${event.layers.length} layer${
      event.layers.length === 1 ? "" : "s"
    } + aggregator · ${calls}`;
  }

  on_agent_started(event) {
    const card = this.card(event.layer, event.index, event, event.is_aggregator);
    card.start = event.t;
    card.setStatus("waiting", "waiting");
  }

  on_agent_text_delta(event) {
    const card = this.cards.get(`${event.layer}:${event.index}`);
    if (!card) return;
    if (card.first === null) {
      card.first = event.t;
      card.setStatus("streaming", "streaming");
    }
    card.text += event.text;
    this.schedule(card);
  }

  on_agent_finished(event) {
    const r = event.result;
    const card = this.card(r.layer, r.index, r, event.is_aggregator);
    card.result = r;
    card.end = event.t;
    if (card.start === null) card.start = Math.max(0, event.t - r.latency_s);
    card.text = r.output;
    const [status, label] = FINISHED[r.status] ?? ["failed", r.status];
    card.setStatus(status, label);
    card.error.hidden = !r.error;
    card.error.textContent = r.error ?? "";
    card.showMeta();
    this.schedule(card);
  }

  on_text_delta(event) {
    this.answer += event.text;
    this.schedule(this);
    // The aggregator's own card: from the answer's pieces when no agent_text_delta came first.
    const writer = [...this.cards.values()].findLast((c) => c.aggregator && c.start !== null);
    if (writer && writer.first === null) {
      writer.first = event.t;
      writer.setStatus("streaming", "streaming");
    }
  }

  on_done(event) {
    this.result = event.result;
    this.cost = event.cost;
    this.total = event.t;
    this.answer = event.result.output;
    this.schedule(this);
  }

  on_error(event) {
    this.total = event.t;
    this.failure = event.message;
    this.errorNode.textContent = event.message;
    this.errorNode.hidden = false;
    for (const layer of event.result?.layers ?? []) {
      for (const agent of layer.agents) {
        const card = this.cards.get(`${agent.layer}:${agent.index}`);
        if (card && !card.result) this.on_agent_finished({ t: event.t, result: agent });
      }
    }
  }

  /** The run ended on our side (stopped, or the connection broke): cut what is still open. */
  stopped(message) {
    for (const card of this.cards.values()) {
      if (card.result === null && (card.start !== null || card.status !== "waiting")) {
        card.setStatus("cut", "cut");
        card.showMeta();
      }
    }
    this.errorNode.textContent = message;
    this.errorNode.hidden = false;
  }

  schedule(target) {
    this.pending.add(target);
    if (this.frame === null) this.frame = requestAnimationFrame(() => this.flush());
  }

  flush() {
    this.frame = null;
    for (const target of this.pending) {
      if (target === this) renderMarkdown(this.answerNode, this.answer);
      else renderMarkdown(target.body, target.text);
    }
    this.pending.clear();
  }

  /** Live timers on the cards still waiting or streaming. */
  tick() {
    if (this.clock === null || this.finished) return;
    const now = (performance.now() - this.clock) / 1000;
    for (const card of this.cards.values()) if (card.result === null) card.showMeta(now);
  }

  /** The run is over (or was replayed): collapse the agents, show the summary and timeline. */
  finish({ live = true } = {}) {
    this.finished = true;
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.flush();
    if (live || this.result || this.failure) this.layers.open = false;
    this.node.classList.add("finished");
    this.answerNode.hidden = this.answer === "";
    this.actions.hidden = false;
    this.copyButton.hidden = this.answer === "";
    this.drawSummary();
    this.drawTimeline();
  }

  drawSummary() {
    const r = this.result;
    const parts = [];
    if (r) {
      parts.push(`first token ${seconds(r.ttft_s)}`, `total ${seconds(r.latency_s)}`);
      const calls = r.layers.reduce((n, l) => n + l.agents.length, 0) + r.aggregator_attempts.length;
      parts.push(`${calls} calls`, `${number.format(r.usage.total_tokens)} tokens`);
      if (this.cost && this.cost.usd !== null) {
        let cost = `$${this.cost.usd.toFixed(4)}`;
        if (this.cost.unpriced_calls) cost += ` (+${this.cost.unpriced_calls} unpriced)`;
        parts.push(cost);
      }
    } else if (this.total !== null) {
      parts.push(`ended after ${seconds(this.total)}`);
    }
    this.summary.textContent = parts.join(" · ");
    this.summary.hidden = parts.length === 0;
  }

  drawTimeline() {
    const calls = [...this.cards.values()].filter((c) => c.start !== null);
    const end = Math.max(this.total ?? 0, ...calls.map((c) => c.end ?? c.start));
    if (calls.length === 0 || !(end > 0)) {
      this.timeline.hidden = true;
      return;
    }
    this.timeline.hidden = false;
    const rows = calls
      .sort((a, b) => a.layer - b.layer || a.index - b.index)
      .map((card) => {
        const row = el("div", "wf-row");
        row.dataset.status = card.status;
        const label = el("span", "wf-label", `${card.aggregator ? "agg" : `L${card.layer}`} ${card.model}`);
        label.title = `${card.provider}/${card.model}`;
        const track = el("span", "wf-track");
        const bar = el("span", "wf-bar");
        const stop = card.end ?? end;
        bar.style.left = `${(100 * card.start) / end}%`;
        bar.style.width = `${Math.max(0.5, (100 * (stop - card.start)) / end)}%`;
        track.append(bar);
        if (card.first !== null) {
          const mark = el("span", "wf-first");
          mark.style.left = `${(100 * card.first) / end}%`;
          mark.title = `first token at ${seconds(card.first)}`;
          track.append(mark);
        }
        const time = el("span", "wf-time", seconds(stop - card.start));
        bar.title = `start ${seconds(card.start)}, end ${seconds(stop)}`;
        row.append(label, track, time);
        return row;
      });
    const scale = el("div", "wf-scale");
    scale.append(el("span", "", "0 s"), el("span", "", seconds(end)));
    this.waterfall.replaceChildren(...rows, scale);
  }
}
