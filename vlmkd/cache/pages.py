"""Self-contained HTML pages (no network: the data, the image and the figures are inline) and PNG
figures for what `vlmkd.cache.view` gathers: `vlmkd cache show` (one sample, one or several
teachers' caches side by side) and `vlmkd cache report` (the whole cache)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:20px} .cols{display:flex;gap:24px;align-items:flex-start}
.col{flex:1;min-width:380px} .tok{display:inline-block;padding:1px 3px;margin:1px;border-radius:3px;
font-family:monospace;font-size:12px;border:1px solid #ddd;cursor:default;white-space:pre}
.tok.q{cursor:pointer;border-color:#99c} .tok.sel{background:#fd6;border-color:#c90} .tok.resp{background:#e6f4e6}
.tok.vis{background:#e8e8f8;color:#669} table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top} .num{text-align:right}
.stage{position:relative;display:inline-block} .stage img{display:block;image-rendering:pixelated}
.stage canvas{position:absolute;left:0;top:0} .muted{color:#777;font-size:12px} code{font-size:12px}
img.fig{max-width:100%}
"""

SHOW_JS = r"""
(function(){
 const views = JSON.parse(document.getElementById('vlmkd-data').textContent);
 let drawn = 0;
 function heat(v){ // white-to-red with alpha for the overlay
   const a = Math.min(1, Math.max(0, v)); return `rgba(220,30,30,${(0.08 + 0.8*a).toFixed(3)})`; }
 function drawGrid(canvas, values, grid, size, label){
   const ctx = canvas.getContext('2d'); canvas.width = size; canvas.height = size;
   ctx.clearRect(0,0,size,size); const c = size/grid; const mx = Math.max(...values, 1e-12);
   values.forEach((v,n)=>{ const x=(n%grid)*c, y=Math.floor(n/grid)*c; ctx.fillStyle=heat(v/mx);
     ctx.fillRect(x,y,c,c); if(label){ ctx.fillStyle='#000'; ctx.font=`${Math.max(9,c/5)}px monospace`;
     ctx.fillText(label(n), x+2, y+Math.max(10,c/4)); }});
   drawn += 1; document.body.dataset.drawn = drawn; }
 views.forEach((v, vi)=>{
   const root = document.getElementById('view'+vi); if(!root) return;
   const size = 288;
   if(v.image && v.attention && v.grid){
     const img = root.querySelector('img.sample'); img.width = size; img.height = size;
     const overlay = root.querySelector('canvas.overlay'); const layerSel = root.querySelector('select.layer');
     const qpos = v.attention.qpos; let q = 0;
     function redraw(){ const L = +layerSel.value; drawGrid(overlay, v.attention.maps[L][q], v.grid, size);
       root.querySelector('.attn-caption').textContent =
         `layer ${v.attention.layers[L]}: attention of token ${qpos[q]} (${JSON.stringify(v.tokens[qpos[q]].text)}) over the ${v.grid}×${v.grid} visual tokens (max ${Math.max(...v.attention.maps[L][q]).toFixed(4)})`;
       root.querySelectorAll('.tok.q').forEach(e=>e.classList.toggle('sel', +e.dataset.q===q)); }
     root.querySelectorAll('.tok.q').forEach(e=>e.addEventListener('click', ()=>{ q = +e.dataset.q; redraw(); }));
     layerSel.addEventListener('change', redraw); redraw();
   }
   if(v.visual_rows && v.grid){
     const ent = root.querySelector('canvas.entropy'), top = root.querySelector('canvas.top1');
     const rows = v.visual_rows.slice(0, v.grid*v.grid);
     if(ent) drawGrid(ent, rows.map(r=>r.entropy), v.grid, 192, n=>rows[n].entropy.toFixed(2));
     if(top) drawGrid(top, rows.map(r=>r.top1), v.grid, 192, n=>rows[n].top1_text.trim().slice(0,6));
   }
 });
 document.body.dataset.ready = '1';
})();
"""


def _e(x) -> str:
    return html.escape(str(x))


def _page(title: str, body: str, script: str = "", data: object = None) -> str:
    blob = ""
    if data is not None:  # JSON inside <script>: "</" cannot end the element
        blob = ('<script type="application/json" id="vlmkd-data">' +
                json.dumps(data).replace("</", "<\\/") + "</script>")
    guard = ("<script>window.onerror=function(m){document.body.dataset.errors="
             "(document.body.dataset.errors||'')+m+';';};</script>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
            f"{guard}</head><body>{body}{blob}<script>{script}</script></body></html>")


def _tokens_html(v: dict) -> str:
    qidx = {p: i for i, p in enumerate(v.get("attention", {}).get("qpos", []))}
    out = []
    for t in v["tokens"]:
        cls = ["tok"] + (["resp"] if t["response"] else []) + (["vis"] if t["visual"] else [])
        extra = ""
        if t["t"] in qidx:
            cls.append("q")
            extra = f" data-q='{qidx[t['t']]}' title='position {t['t']}: show its attention'"
        out.append(f"<span class='{' '.join(cls)}'{extra}>{_e(t['text'])}</span>")
    return "".join(out)


def _scored_html(v: dict, shown: int = 5) -> str:
    rows = []
    for r in v["scored"]:
        if "draws" in r:
            cells = ", ".join(f"{_e(repr(t))} {w:.3f}" for t, _, w in r["draws"][:shown])
            full = "<br>".join(f"{_e(repr(t))} (id {i}) weight {w:.6g}" for t, i, w in r["draws"])
            tail = "—"
        else:
            cells = ", ".join(f"{_e(repr(t))} {p:.3f}" for t, _, p in r["top"][:shown])
            full = "<br>".join(f"{_e(repr(t))} (id {i}) {p:.6g}" for t, i, p in r["top"])
            tail = f"{r['tail']:.4g}"
        kind = "visual" if r["visual"] else "response"
        rows.append(f"<tr data-pos='{r['pos']}'><td class='num'>{r['pos']}</td><td>{kind}</td>"
                    f"<td>{_e(repr(r['next']))}</td><td>{cells}<details><summary>all</summary>{full}</details></td>"
                    f"<td class='num'>{tail}</td></tr>")
    head = "<tr><th>row</th><th>kind</th><th>next token</th><th>teacher's top ids (probability)</th><th>tail</th></tr>"
    return f"<table class='scored'>{head}{''.join(rows)}</table>"


def _view_html(v: dict, i: int) -> str:
    fields = ", ".join(f"{_e(k)}: {_e(x)}" for k, x in (v.get("fields") or {}).items())
    ext = v["extraction"]
    parts = [f"<div class='col' id='view{i}'><h2>{_e(v['cache'])}</h2>",
             f"<p class='muted'>teacher {_e(v['teacher'])} · {_e(ext['logits'])} "
             f"{_e(ext['topk'] if ext['logits'] != 'sampled' else ext['draws'])} · {len(v['tokens'])} tokens · "
             f"{len(v['scored'])} scored rows{(' · ' + fields) if fields else ''}</p>"]
    if v["image"]:
        img = v["image"]
        if v.get("attention") and v.get("grid"):
            opts = "".join(f"<option value='{j}'>layer {li}</option>" for j, li in enumerate(v["attention"]["layers"]))
            parts.append(f"<h2>Attention over the image</h2><p>cached layer <select class='layer'>{opts}</select> "
                         "· click a highlighted token below</p>"
                         f"<div class='stage'><img class='sample' src='{img['data_uri']}' alt='sample image'>"
                         "<canvas class='overlay'></canvas></div><p class='attn-caption muted'></p>")
        else:
            parts.append(f"<h2>Image</h2><img class='sample' src='{img['data_uri']}' width='288' height='288' "
                         "alt='sample image'>")
        parts.append(f"<p class='muted'>{img['width']}×{img['height']} px, {img['stored_bytes']} bytes stored</p>")
    else:
        parts.append("<p class='muted'>text-only sample: no image, no visual payloads</p>")
    parts.append(f"<h2>Tokens</h2><div class='tokens'>{_tokens_html(v)}</div>"
                 "<p class='muted'>green: response tokens (the loss's); blue: visual tokens; outlined: text tokens "
                 "after the image (their attention is cached)</p>")
    if v.get("visual_rows") and v.get("grid"):
        parts.append("<h2>The teacher on the visual tokens</h2><div class='cols'><div><canvas class='entropy'>"
                     "</canvas><p class='muted'>entropy (nats; top-k + tail bucket)</p></div><div><canvas class='top1'>"
                     "</canvas><p class='muted'>top-1 token and its probability (shade)</p></div></div>")
    parts.append(f"<h2>Scored rows</h2>{_scored_html(v)}</div>")
    return "".join(parts)


def show_html(views: list[dict]) -> str:
    """One sample's page; several views (teachers' caches of the same sample) side by side."""
    v0 = views[0]
    body = (f"<h1>sample {_e(v0['id'])}</h1><p>{_e(v0['prompt'])}</p>"
            f"<div class='cols'>{''.join(_view_html(v, i) for i, v in enumerate(views))}</div>")
    return _page(f"vlmkd · {v0['id']}", body, SHOW_JS, views)


def figures(report: dict) -> dict[str, bytes]:
    """PNG figures of a report: the teacher's entropy, tail mass and top-1 probability histograms, and
    the shards' build time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    hist = report.get("histograms") or {}
    if hist.get("response"):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        for ax, key, label in zip(axes, ("entropy", "tail", "top1"),
                                  ("entropy (nats, top-k + tail)", "tail mass", "top-1 probability"), strict=True):
            for side, color in (("response", "tab:blue"), ("visual", "tab:orange")):
                h = (hist.get(side) or {}).get(key)
                if h and h["n"]:
                    e = h["edges"]
                    ax.stairs([c / h["n"] for c in h["counts"]], e, color=color, label=f"{side} ({h['n']:,} rows)")
            ax.set_xlabel(label)
            ax.set_ylabel("share of rows")
            ax.legend(fontsize=8)
        fig.suptitle(f"teacher distributions in {Path(report['cache']).name}")
        fig.tight_layout()
        out["distributions.png"] = _png(fig)
    sh = report["shards"]
    if sh:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.bar(range(len(sh)), [s["seconds"] for s in sh], color="tab:green")
        ax.set_xlabel("shard")
        ax.set_ylabel("build seconds")
        ax.set_title("time to build each shard")
        fig.tight_layout()
        out["shards.png"] = _png(fig)
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _source_link(source: str) -> str:
    """A reject's source (`/data/m.jsonl:7`, `/data/m.json[3]`, an image path) as a link to its file."""
    path = source.split("[")[0].rsplit(":", 1)[0] if source.startswith("/") else ""
    if not path:
        return f"<span class='muted'>{_e(source)}</span>"
    return f"<a class='muted' href='file://{html.escape(path, quote=True)}'>{_e(source)}</a>"


def report_html(report: dict, pngs: dict[str, bytes]) -> str:
    s = report["summary"]
    kinds = ", ".join(f"{k}: {v:,}" for k, v in (report.get("sample_kinds") or {}).items())
    rows = [("samples", f"{s['samples']:,}"), ("scored tokens", f"{s['scored_tokens']:,}"),
            ("tokens", f"{s['tokens']:,}"), ("rejected rows", f"{s['rejects']:,}"), ("shards", s["shards"]),
            ("bytes", f"{s['bytes']:,} ({s['bytes'] / 2**20:.1f} MiB)"),
            ("build time", f"{s['build_seconds']:.0f} s"), ("teacher", s["teacher"].get("model_type")),
            ("sample kinds (read)", kinds or "—")]
    for part, w in (report.get("ids_per_row") or {}).items():
        full = f", {w['at_k']:.0%} of rows at k" if w.get("at_k") is not None else ""
        rows.append((f"ids per {part} row (read)", f"{w['mean']:.1f} mean over {w['rows']:,} rows{full}"))
    summary = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    payload = "".join(f"<tr><td>{_e(k)}</td><td class='num'>{v:,}</td><td class='num'>"
                      f"{s['bytes_per_token'].get(k, 0):.1f}</td></tr>" for k, v in sorted(s["payload_bytes"].items()))
    payload += f"<tr><th>shards on disk</th><td class='num'>{s['bytes']:,}</td><td class='num'>" \
               f"{s['bytes_per_token']['shard_total']:.1f}</td></tr>"
    rej = "".join(f"<tr><td class='num'>{g['count']:,}</td><td>{_e(g['reason'])}</td><td>" +
                  "<br>".join(f"{_e(x['id'])} {_source_link(x['source'])}" for x in g["examples"]) +
                  "</td></tr>" for g in report["rejects"]) or "<tr><td colspan='3'>none</td></tr>"
    imgs = "".join(f"<p><img class='fig' alt='{_e(name)}' src='data:image/png;base64,{base64.b64encode(b).decode()}'></p>"
                   for name, b in pngs.items())
    ext = json.dumps(s["extraction"], indent=1)
    body = (f"<h1>cache {_e(report['cache'])}</h1><table>{summary}</table>"
            f"<h2>Bytes per payload</h2><table><tr><th>payload</th><th>bytes</th><th>per scored token</th></tr>"
            f"{payload}</table><h2>Rejected rows, by reason</h2><table><tr><th>rows</th><th>reason</th>"
            f"<th>examples</th></tr>{rej}</table><h2>Figures</h2>{imgs}"
            f"<p class='muted'>{_e(report.get('note', ''))}</p><h2>Extraction</h2><pre>{_e(ext)}</pre>")
    return _page("vlmkd · cache report", body, "document.body.dataset.ready='1';", None)
