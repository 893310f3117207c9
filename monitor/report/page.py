"""``qcloop report``: one self-contained offline HTML page for a demo folder, an assess/predict
output or a monitor folder.

The page makes no request of its own: its styles and script are inline, its plots are PNG data
URIs, and a Content-Security-Policy forbids anything else; case figures and masks are linked by
relative paths to the files beside the records (never inlined, so 10,000 cases stay a few MB).
The case table (all cases, flagged only by default) is embedded once as compact JSON and drawn
50 rows a page by the inline script, which sorts by any column; thumbnails load lazily.
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any

from qcloop.monitor.core import atomic
from qcloop.monitor.report import plots
from qcloop.monitor.report.sources import ReportSource, read_source

__all__ = ["CASE_COLUMNS", "build_report", "write_report"]

#: The case table's columns, in the order of the embedded rows.
CASE_COLUMNS = (
    "case",
    "view",
    "phase",
    "vendor",
    "OoD",
    "pDC",
    "pHD (mm)",
    "est Dice",
    "true Dice",
    "figure",
    "mask",
)

_CSP = (
    "default-src 'none'; img-src data: file: 'self'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:2px 6px}
th{background:#f4f4f4;cursor:pointer;user-select:none}td.num{text-align:right}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plot img{max-width:100%;border:1px solid #eee}
.warn{color:#a40}img.thumb{width:180px}.pager button{margin:0 .3em}
"""
_SCRIPT = """
(function(){
const cols=JSON.parse(document.getElementById('case-columns').textContent);
const all=JSON.parse(document.getElementById('case-data').textContent);
const body=document.querySelector('#cases tbody'),info=document.getElementById('page-info');
const only=document.getElementById('flagged-only');let key=-1,dir=1,page=0;const per=50;
function rows(){let r=only.checked?all.filter(x=>x[4]===true):all.slice();
 if(key>=0)r.sort((a,b)=>{const x=a[key],y=b[key];if(x===y)return 0;if(x===null)return 1;
  if(y===null)return -1;return (x<y?-1:1)*dir;});return r;}
function cell(tr,v,i){const td=document.createElement('td');
 if(cols[i]==='figure'&&v){const a=document.createElement('a');a.href=v;const im=document.createElement('img');
  im.src=v;im.loading='lazy';im.className='thumb';im.alt='QC figure';a.appendChild(im);td.appendChild(a);}
 else if(cols[i]==='mask'&&v){const a=document.createElement('a');a.href=v;a.textContent='mask';td.appendChild(a);}
 else{td.textContent=v===null?'':(typeof v==='number'?v.toFixed(3):String(v));if(typeof v==='number')td.className='num';}
 tr.appendChild(td);}
function draw(){const r=rows(),pages=Math.max(1,Math.ceil(r.length/per));page=Math.min(page,pages-1);
 body.replaceChildren();for(const x of r.slice(page*per,page*per+per)){const tr=document.createElement('tr');
  x.forEach((v,i)=>cell(tr,v,i));body.appendChild(tr);}
 info.textContent=`${r.length} case(s), page ${page+1} of ${pages}`;}
document.querySelectorAll('#cases th').forEach((th,i)=>th.addEventListener('click',()=>{
 dir=(key===i)?-dir:1;key=i;page=0;draw();}));
only.addEventListener('change',()=>{page=0;draw();});
document.getElementById('prev').addEventListener('click',()=>{page=Math.max(0,page-1);draw();});
document.getElementById('next').addEventListener('click',()=>{page+=1;draw();});
draw();})();
"""


def _rel(path: Any, base: Path) -> str | None:
    """``path`` relative to the report's folder (a link that works offline), if it exists."""
    if not path or not Path(str(path)).is_file():
        return None
    return Path(os.path.relpath(Path(str(path)).resolve(), base.resolve())).as_posix()


def _case_rows(source: ReportSource, base: Path) -> list[list[Any]]:
    return [
        [r["id"], r["view"], r["phase"], r["vendor"], r["ood"], r["pdc"], r["phd_mm"],
         r.get("est_dice"), r["true_dice"], _rel(r["figure"], base), _rel(r["mask"], base)]
        for r in source.rows
    ]  # fmt: skip


def _json_script(element_id: str, obj: Any) -> str:
    # "<" as its JSON escape: no text in the data can end the script element or open a tag
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            text = f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ablation_section(ablation: dict[str, Any]) -> str:
    """The demo's ablation tables: per configuration, vendor, view and structure, then the
    pDC correlations and the OoD flags."""
    parts = ["<h2>Ablation</h2>"]
    for name, title in (("rows", "segmentation"), ("qc", "QC"), ("ood", "OoD flags")):
        rows = ablation.get(name) or []
        if rows:
            parts.append(
                f"<details open><summary>{title}</summary>{_table(rows, list(rows[0]))}</details>"
            )
    return "".join(parts)


def _plots_section(source: ReportSource) -> str:
    drawn = [
        ("pdc-vs-dice", plots.pdc_vs_dice(source.rows)),
        ("roc", plots.roc(source.rows)),
        ("distributions", plots.distributions(source.rows)),
        ("flagged-by-vendor", plots.flagged_by_vendor(source.rows)),
    ]
    if source.kind == "monitor":
        drawn.insert(0, ("monitor-timeline", plots.monitor_timeline(source.rows, source.events)))
    figures = [
        f'<figure class="plot" id="plot-{name}"><img alt="{name}" src="{uri}"></figure>'
        for name, uri in drawn
        if uri is not None
    ]
    return '<h2>Plots</h2><div class="plots">' + "".join(figures) + "</div>"


def _summary_section(source: ReportSource) -> str:
    n, flagged = len(source.rows), sum(bool(r["ood"]) for r in source.rows)
    truth = sum(r["true_dice"] is not None for r in source.rows)
    lines = [
        f"<p>{html.escape(source.kind)} folder <code>{html.escape(str(source.folder))}</code>: "
        f"{n} case(s), {flagged} flagged OoD, {truth} with ground truth.</p>"
    ]
    lines += [f'<p class="warn">{html.escape(w)}</p>' for w in source.warnings[:20]]
    if source.kind == "monitor":
        kinds: dict[str, int] = {}
        for e in source.events:
            kinds[e.get("event", "?")] = kinds.get(e.get("event", "?"), 0) + 1
        text = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "none"
        lines.append(f"<p>ledger events: {html.escape(text)}.</p>")
    return "".join(lines)


def build_report(folder: str | Path, out: str | Path) -> str:
    """The report page of ``folder`` as HTML text, with links relative to ``out``'s folder."""
    source = read_source(folder)
    base = Path(out).resolve().parent
    parts = [f"<h1>qcloop report: {html.escape(source.kind)}</h1>", _summary_section(source)]
    parts.append(_plots_section(source))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in CASE_COLUMNS)
    parts.append(
        '<h2>Cases</h2><p><label><input type="checkbox" id="flagged-only" checked> flagged '
        'only</label> <span class="pager"><button id="prev">previous</button><span '
        'id="page-info"></span><button id="next">next</button></span></p>'
        f'<table id="cases"><thead><tr>{head}</tr></thead><tbody></tbody></table>'
    )
    if source.ablation is not None:
        parts.append(_ablation_section(source.ablation))
    parts.append(_json_script("case-columns", list(CASE_COLUMNS)))
    parts.append(_json_script("case-data", _case_rows(source, base)))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>qcloop report: {html.escape(str(source.folder.name))}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}<script>{_SCRIPT}</script>"
        "</body></html>"
    )


def write_report(folder: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the report of ``folder`` to ``out`` (write, then rename); its size and build time."""
    t0 = time.perf_counter()
    text = build_report(folder, out)
    atomic.write_text(out, text)
    return {"path": str(out), "bytes": len(text.encode()), "seconds": time.perf_counter() - t0}
