#!/usr/bin/env python3
"""Train Payguard's fraud model from the Parquet that `payguard replay` writes.

    payguard replay --config config.toml --no-model --input ... --labels LABELS.jsonl --output train.parquet
    models/.venv/bin/python models/train.py --config config.toml --input train.parquet

Generic on purpose: training and serving use the very same feature SQL, because the features are
whatever `features.sql` yielded in the replay. The feature columns are every column of the Parquet
that is not
  * a canonical transaction column (README, "SQL contracts": transaction_id ... longitude),
  * a column the engine adds after the features (score, model_version, decision, rule_hits,
    explanation),
  * the label column (--label-column) or one of the other columns replay adds with --labels
    (label_scenario, label_reported_at),
and has a numeric or boolean type; a non-numeric feature column is skipped with a warning (the
model can only take numbers). Their order is the Parquet's, i.e. the SELECT order of features.sql.

Steps (all deterministic for a given input and --seed):
  1. Label maturity: rows whose day ends later than (last label report - --label-maturity-days)
     are dropped, since their labels may not have arrived yet.
  2. Time split by UTC day: the last --test-days days are the test set, --gap-days before them are
     left out (the label delay a real deployment has between training and use), the
     --calibration-days before the gap calibrate (and early-stop) the model, the rest train it.
  3. LightGBM (gradient-boosted trees) and a logistic-regression baseline (metrics only).
  4. Calibration: Platt scaling of the trees' log-odds, fitted on the calibration days, built into
     the ONNX graph (Clip -> log-odds -> a*x+b -> Sigmoid), so the graph's `score` is the
     calibrated fraud probability.
  5. ONNX export (input `features` float32 [N, F], NULL = NaN = LightGBM's missing value; output
     `score` float32 [N]) with metadata_props payguard.* (features, feature_types, model_version,
     label_column, training_window, thresholds, metrics, baseline).
  6. models/MODEL_CARD.md with the held-out metrics against the rules-only baseline (the
     `decision` of the replay, which must run without a model: `replay --no-model`), and a parity
     fixture (models/parity/rows.parquet: feature rows plus the scores Python onnxruntime gives
     them) for the Rust parity test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import time
import tomllib
import warnings

import lightgbm as lgb
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper
from onnxmltools.convert import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# The canonical transaction columns (README, "SQL contracts"; src/engine/canonical.rs).
CANONICAL = [
    "transaction_id", "event_time", "source", "amount", "currency", "customer_id", "account_id",
    "card_id", "merchant_id", "terminal_id", "mcc", "country", "channel", "device_id",
    "ip_address", "latitude", "longitude",
]
# Columns the engine adds after the features.
ENGINE_ADDED = ["score", "model_version", "decision", "rule_hits", "explanation"]
# Columns `payguard replay --labels` adds besides the label itself.
LABEL_ADDED = ["label", "label_scenario", "label_reported_at"]
# Arrow types the model takes, and their names in payguard.feature_types.
TYPE_NAMES = {
    pa.float64(): "float64", pa.float32(): "float32", pa.int64(): "int64", pa.int32(): "int32",
    pa.bool_(): "bool", pa.string(): "category", pa.large_string(): "category",
    pa.string_view(): "category",
}
# A category keeps at most this many values (the most frequent in training), each seen at least
# MIN_CATEGORY_ROWS times; the rest, like NULL, are "missing" (NaN) for the model.
MAX_CATEGORY_VALUES = 64
MIN_CATEGORY_ROWS = 20
RULE_RANK = {"approve": 0, "review": 1, "decline": 2}


def log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def canonical_columns(schema: pa.Schema, cfg: dict) -> set[str]:
    """The transaction's own columns: the canonical ones and the source attributes (config.toml
    [[attributes]]; the replay also marks how many leading columns are canonical)."""
    names = set(CANONICAL) | {a["name"] for a in cfg.get("attributes", [])}
    width = (schema.metadata or {}).get(b"payguard.canonical_columns")
    if width:
        names |= set(schema.names[:int(width)])
    return names


def feature_columns(schema: pa.Schema, label_column: str, canonical: set[str]) -> tuple[list[str], list[str]]:
    names, types = [], []
    for field in schema:
        n = field.name
        if n in canonical or n in ENGINE_ADDED or n == label_column or n in LABEL_ADDED:
            continue
        t = TYPE_NAMES.get(field.type)
        if t is None:
            log(f"skipping feature {n}: type {field.type} is neither a number nor a text category")
            continue
        names.append(n)
        types.append(t)
    if not names:
        sys.exit("no feature column in the input: is it a `payguard replay` Parquet?")
    return names, types


def vocabularies(df: pd.DataFrame, features: list[str], types: list[str]) -> dict[str, list[str]]:
    """Per category feature, its values in code order: the most frequent first (ties by value),
    at most MAX_CATEGORY_VALUES, each seen at least MIN_CATEGORY_ROWS times in `df`."""
    out = {}
    for f, t in zip(features, types):
        if t != "category":
            continue
        counts = df[f].dropna().astype(str).value_counts()
        counts = counts[counts >= MIN_CATEGORY_ROWS]
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CATEGORY_VALUES]
        out[f] = [v for v, _ in ordered]
    return out


def matrix(df: pd.DataFrame, features: list[str], vocab: dict[str, list[str]]) -> np.ndarray:
    """float32 [N, F]; NULL -> NaN (what the Rust side sends for NULL too); a category -> its code
    in `vocab`, NaN when NULL or not in it (as src/model/tensor.rs does)."""
    cols = []
    for f in features:
        if f in vocab:
            codes = {v: float(i) for i, v in enumerate(vocab[f])}
            cols.append(df[f].map(lambda v: codes.get(v, np.nan) if isinstance(v, str) else np.nan)
                        .astype("float64").to_numpy())
        else:
            cols.append(pd.to_numeric(df[f], errors="coerce").astype("float64").to_numpy())
    return np.ascontiguousarray(np.stack(cols, axis=1).astype(np.float32))


def rules_rank(df: pd.DataFrame) -> np.ndarray:
    """The rules-only ranking: decision severity, then the number of rule hits."""
    sev = df["decision"].map(RULE_RANK).fillna(0).to_numpy(dtype=float)
    hits = df["rule_hits"].map(lambda s: len(json.loads(s)) if s else 0).to_numpy(dtype=float)
    return sev + np.minimum(hits, 9) / 10.0


def entity(df: pd.DataFrame) -> pd.Series:
    """The card (or, for non-card payments, the account, then the customer) of each row."""
    return df["card_id"].fillna(df["account_id"]).fillna(df["customer_id"]).fillna(df["transaction_id"])


def card_precision_top_k(df: pd.DataFrame, score: np.ndarray, y: np.ndarray, k: int = 100) -> float:
    """Per day: the k entities with the highest score, share of them with a fraud that day; mean."""
    d = pd.DataFrame({"day": df["day"].to_numpy(), "ent": entity(df).to_numpy(), "s": score, "y": y})
    per = d.groupby(["day", "ent"]).agg(s=("s", "max"), y=("y", "max")).reset_index()
    out = []
    for _, g in per.groupby("day"):
        top = g.sort_values(["s", "ent"], ascending=[False, True]).head(k)
        out.append(top["y"].mean())
    return float(np.mean(out))


def at_threshold(score: np.ndarray, y: np.ndarray, t: float) -> dict:
    flag = score >= t
    tp = int((flag & (y == 1)).sum())
    n = int(flag.sum())
    return {
        "threshold": t,
        "alerts": n,
        "precision": tp / n if n else 0.0,
        "recall": tp / max(int(y.sum()), 1),
    }


def evaluate(df: pd.DataFrame, score: np.ndarray, y: np.ndarray, review: float, decline: float) -> dict:
    m = {
        "roc_auc": float(roc_auc_score(y, score)),
        "average_precision": float(average_precision_score(y, score)),
        "review": at_threshold(score, y, review),
        "decline": at_threshold(score, y, decline),
        "card_precision_top100_per_day": card_precision_top_k(df, score, y),
        "recall_by_scenario": {},
    }
    scen = df["label_scenario"].to_numpy()
    for s in sorted(set(x for x in scen if isinstance(x, str))):
        mask = (scen == s) & (y == 1)
        m["recall_by_scenario"][s] = {
            "frauds": int(mask.sum()),
            "review": float((score[mask] >= review).mean()) if mask.any() else 0.0,
            "decline": float((score[mask] >= decline).mean()) if mask.any() else 0.0,
        }
    return m


def calibrate_onnx(model: onnx.ModelProto, a: float, b: float) -> onnx.ModelProto:
    """Replace the outputs of the converted LightGBM classifier by `score` = sigmoid(a*logit(p1)+b)."""
    g = model.graph
    prob = next(o.name for o in g.output if "prob" in o.name)
    eps = 1e-7
    inits = [
        helper.make_tensor("pg_idx1", TensorProto.INT64, [], [1]),
        helper.make_tensor("pg_lo", TensorProto.FLOAT, [], [eps]),
        helper.make_tensor("pg_hi", TensorProto.FLOAT, [], [1.0 - eps]),
        helper.make_tensor("pg_one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("pg_a", TensorProto.FLOAT, [], [a]),
        helper.make_tensor("pg_b", TensorProto.FLOAT, [], [b]),
    ]
    nodes = [
        helper.make_node("Gather", [prob, "pg_idx1"], ["pg_p"], axis=1, name="pg_take_fraud"),
        helper.make_node("Clip", ["pg_p", "pg_lo", "pg_hi"], ["pg_pc"], name="pg_clip"),
        helper.make_node("Sub", ["pg_one", "pg_pc"], ["pg_q"], name="pg_one_minus"),
        helper.make_node("Div", ["pg_pc", "pg_q"], ["pg_odds"], name="pg_odds"),
        helper.make_node("Log", ["pg_odds"], ["pg_logit"], name="pg_logit"),
        helper.make_node("Mul", ["pg_logit", "pg_a"], ["pg_ax"], name="pg_platt_a"),
        helper.make_node("Add", ["pg_ax", "pg_b"], ["pg_axb"], name="pg_platt_b"),
        helper.make_node("Sigmoid", ["pg_axb"], ["score"], name="pg_sigmoid"),
    ]
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, 13)  # Clip with min/max inputs, Gather with a scalar index
    g.initializer.extend(inits)
    g.node.extend(nodes)
    while len(g.output):
        g.output.pop()
    g.output.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, [None]))
    onnx.checker.check_model(model)
    return model


def platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    lr = LogisticRegression(C=1e6, max_iter=1000)
    lr.fit(logit.reshape(-1, 1), y)
    return float(lr.coef_[0][0]), float(lr.intercept_[0])


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_card(path: str, ctx: dict) -> None:
    m, r, lrm = ctx["model_metrics"], ctx["rules_metrics"], ctx["lr_metrics"]
    rv, dc = ctx["thresholds"]["review"], ctx["thresholds"]["decline"]
    L = []
    L.append("# Model card: Payguard fraud model")
    L.append("")
    L.append(f"*Written by `models/train.py`; do not edit by hand.* Model version `{ctx['version']}`.")
    L.append("")
    L.append("## Reproduce")
    L.append("")
    L.append("```sh")
    L.append(ctx["reproduce"])
    L.append("```")
    L.append("")
    L.append("## Data")
    L.append("")
    L.append(f"- Input: `{ctx['input_name']}`, {ctx['rows_total']:,} transactions from `payguard replay` "
             f"(features from `sql/features.sql`, label column `{ctx['label_column']}`).")
    L.append(f"- Label maturity: rows after {ctx['mature_until']} dropped (labels reported up to "
             f"{ctx['last_report']}, maturity {ctx['maturity_days']} days).")
    for name in ("train", "calibration", "gap", "test"):
        s = ctx["splits"][name]
        L.append(f"- {name}: {s['from']} .. {s['to']} ({s['days']} days), {s['rows']:,} rows, "
                 f"{s['frauds']:,} frauds ({pct(s['frauds'] / max(s['rows'], 1))})"
                 + (" — not used" if name == "gap" else ""))
    L.append("")
    L.append("## Model")
    L.append("")
    L.append(f"- LightGBM {lgb.__version__}, binary objective, {ctx['trees']} trees (early stopping on the "
             f"calibration days, at most {ctx['max_trees']}), {ctx['params']['num_leaves']} leaves and depth "
             f"{ctx['params']['max_depth']} at most, learning rate {ctx['params']['learning_rate']}, seed {ctx['seed']}.")
    L.append(f"- Chosen among these candidates by average precision on the calibration days, each within "
             f"{ctx['depth_budget']} trees x depth (scoring cost; rows/s: Python onnxruntime, one thread, "
             f"batch 10,000, on the machine that trained it):")
    L.append("")
    L.append("| leaves | depth | learning rate | trees | calibration AP | rows/s |")
    L.append("|---|---|---|---|---|---|")
    for c in ctx["candidates"]:
        L.append(f"| {c['leaves']} | {c['depth']} | {c['learning_rate']} | {c['trees']} | "
                 f"{c['calibration_ap']:.4f} | {c['speed']:,.0f} |")
    L.append("")
    if ctx["vocab"]:
        L.append("- Categories (text features, LightGBM categorical splits): each value's code is its "
                 "rank by frequency in training; NULL and values not listed are missing (NaN):")
        for f, values in ctx["vocab"].items():
            L.append(f"  - `{f}`: " + ", ".join(f"`{v}`" for v in values))
    L.append(f"- Calibration: Platt scaling of the trees' log-odds on the calibration days, "
             f"score = sigmoid({ctx['platt'][0]:.4f} * logit(p) {'+' if ctx['platt'][1] >= 0 else '-'} {abs(ctx['platt'][1]):.4f}), in the ONNX graph.")
    L.append("- ONNX: input `features` float32 [N, F] in the order below, NULL as NaN (LightGBM's "
             "missing value); output `score` float32 [N], the calibrated fraud probability.")
    L.append("- Scoring speed: `payguard bench model` (BENCHMARKS.md); train.py logs Python onnxruntime's.")
    L.append(f"- Thresholds (from `[engine]` of the config): review at score >= {rv}, decline at >= {dc}.")
    L.append(f"- Features ({len(ctx['features'])}), with the training median used as the explanation "
             "baseline and the trees' gain share:")
    L.append("")
    L.append("| feature | type | baseline (median; a category's most frequent value) | gain share |")
    L.append("|---|---|---|---|")
    for f, t, b, gshare in zip(ctx["features"], ctx["types"], ctx["baseline"], ctx["gain"]):
        shown = (f"`{ctx['vocab'][f][0]}`" if ctx["vocab"].get(f) else "-") if t == "category" else f"{b:.4g}"
        L.append(f"| `{f}` | {t} | {shown} | {pct(gshare)} |")
    L.append("")
    L.append("## Held-out results (test days)")
    L.append("")
    L.append("Rules-only baseline: the `decision` of the same replay without a model (rules of "
             "`sql/rules.sql`), ranked by severity then number of rule hits.")
    L.append("")
    L.append("| metric | LightGBM (shipped) | logistic regression | rules only |")
    L.append("|---|---|---|---|")
    L.append(f"| ROC AUC | {m['roc_auc']:.4f} | {lrm['roc_auc']:.4f} | {r['roc_auc']:.4f} |")
    L.append(f"| average precision | {m['average_precision']:.4f} | {lrm['average_precision']:.4f} | "
             f"{r['average_precision']:.4f} |")
    L.append(f"| card precision, top 100 per day | {m['card_precision_top100_per_day']:.3f} | "
             f"{lrm['card_precision_top100_per_day']:.3f} | {r['card_precision_top100_per_day']:.3f} |")
    L.append(f"| precision / recall at review (model >= {rv}; rules: review or decline) | "
             f"{pct(m['review']['precision'])} / {pct(m['review']['recall'])} ({m['review']['alerts']} alerts) | "
             f"{pct(lrm['review']['precision'])} / {pct(lrm['review']['recall'])} | "
             f"{pct(r['review']['precision'])} / {pct(r['review']['recall'])} ({r['review']['alerts']} alerts) |")
    L.append(f"| precision / recall at decline (model >= {dc}; rules: decline) | "
             f"{pct(m['decline']['precision'])} / {pct(m['decline']['recall'])} ({m['decline']['alerts']} alerts) | "
             f"{pct(lrm['decline']['precision'])} / {pct(lrm['decline']['recall'])} | "
             f"{pct(r['decline']['precision'])} / {pct(r['decline']['recall'])} ({r['decline']['alerts']} alerts) |")
    L.append("")
    L.append("Combined (what the engine decides with the model: the stronger of model and rules): "
             f"precision / recall of review-or-decline {pct(ctx['combined']['precision'])} / "
             f"{pct(ctx['combined']['recall'])} ({ctx['combined']['alerts']} alerts).")
    L.append("")
    L.append("### Recall per fraud scenario (test days)")
    L.append("")
    L.append("| scenario | frauds | model: review | model: decline | rules: review or decline |")
    L.append("|---|---|---|---|---|")
    for s, v in m["recall_by_scenario"].items():
        rr = r["recall_by_scenario"].get(s, {"review": 0.0})
        L.append(f"| `{s}` | {v['frauds']} | {pct(v['review'])} | {pct(v['decline'])} | {pct(rr['review'])} |")
    L.append("")
    prev = ctx.get("previous")
    if prev and prev["metrics"].get("test"):
        pm = prev["metrics"]["test"]["model"]
        L.append("### Before and after (same test days)")
        L.append("")
        L.append(f"The model this one replaced: `{prev['version']}`, {prev['features']} features.")
        L.append("")
        L.append("| metric | before | after |")
        L.append("|---|---|---|")
        L.append(f"| average precision | {pm['average_precision']:.4f} | {m['average_precision']:.4f} |")
        L.append(f"| card precision, top 100 per day | {pm['card_precision_top100_per_day']:.3f} | "
                 f"{m['card_precision_top100_per_day']:.3f} |")
        L.append(f"| recall at review | {pct(pm['review_recall'])} | {pct(m['review']['recall'])} |")
        L.append(f"| recall at decline | {pct(pm['decline_recall'])} | {pct(m['decline']['recall'])} |")
        for sc, v in m["recall_by_scenario"].items():
            before = prev["metrics"].get("recall_by_scenario", {}).get(sc)
            b_txt = f"{pct(before['review'])}" if before else "-"
            L.append(f"| recall at review, `{sc}` | {b_txt} | {pct(v['review'])} |")
        L.append("")
    L.append("## What it does not catch")
    L.append("")
    weak = [(s, v) for s, v in m["recall_by_scenario"].items() if v["review"] < 0.5]
    if weak:
        for s, v in sorted(weak, key=lambda x: x[1]["review"]):
            L.append(f"- `{s}`: only {pct(v['review'])} of its frauds reach the review threshold.")
    L.append(f"- Overall, {pct(1 - m['review']['recall'])} of the test-day frauds score below the review "
             f"threshold ({int(round((1 - m['review']['recall']) * ctx['splits']['test']['frauds']))} of "
             f"{ctx['splits']['test']['frauds']}); the rules still catch some of them (combined recall above).")
    L.append("- Trained and tested on simulated traffic only (`payguard generate`, six scenarios). "
             "Fraud patterns it has never seen, and real traffic's drift, are not measured here.")
    label_feats = [f for f in ctx.get("features", []) if "labels" in str(f)]
    if label_feats:
        L.append("- Label features (" + ", ".join(f"`{f}`" for f in label_feats) + ") only know the "
                 "fraud reported before each transaction: the first frauds of a new merchant, terminal "
                 "or card, before any report, rely on the behaviour features alone.")
    else:
        L.append("- Features see only the payment stream, not labels: a merchant or device already "
                 "known to be fraudulent is not remembered unless features.sql learns label-based "
                 "features (fraud_labels(*)).")
    L.append("- The first transactions of a card/customer have no history: velocity features are "
             "near zero and the score relies on the amount, hour and channel.")
    L.append("")
    L.append("## Metrics (JSON, also in the ONNX metadata `payguard.metrics`)")
    L.append("")
    L.append("```json")
    L.append(json.dumps(ctx["metrics_json"], indent=1, sort_keys=True))
    L.append("```")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="Parquet written by `payguard replay --labels ...`")
    ap.add_argument("--config", help="config.toml: [model] label_column and [engine] thresholds")
    ap.add_argument("--label-column", help="label column (default: [model] label_column, else 'label')")
    ap.add_argument("--output", default="models/fraud_model.onnx")
    ap.add_argument("--card", default="models/MODEL_CARD.md")
    ap.add_argument("--parity", default="models/parity", help="directory of the parity fixture ('' = none)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--test-days", type=int, default=4)
    ap.add_argument("--gap-days", type=int, default=1)
    ap.add_argument("--calibration-days", type=int, default=2)
    ap.add_argument("--label-maturity-days", type=float, default=3.0)
    # Scoring cost grows with trees x depth: the candidates are tuned on the calibration days within
    # a budget of trees x depth (deterministic, unlike a timing: same data, same model).
    ap.add_argument("--trees", type=int, default=300, help="most trees (early stopping may use fewer)")
    ap.add_argument("--candidates", default="15:5:0.1,31:6:0.08,63:8:0.06",
                    help="leaves:depth:learning_rate of each candidate, comma-separated")
    ap.add_argument("--patience", type=int, default=30, help="early-stopping rounds without gain")
    ap.add_argument("--min-trees", type=int, default=20, help="fewest trees early stopping may keep")
    ap.add_argument("--depth-budget", type=int, default=400,
                    help="most trees x depth of a candidate (scoring cost; 400 keeps `payguard bench model` near 400k rows/s)")
    ap.add_argument("--previous", help="the model this one replaces (ONNX): its test figures go in the card beside the new ones")
    ap.add_argument("--review-threshold", type=float)
    ap.add_argument("--decline-threshold", type=float)
    ap.add_argument("--version", help="model version (default: fraud-lgbm-<last train day>-<hash>)")
    ap.add_argument("--reproduce", default="make model", help="command recorded in the card")
    args = ap.parse_args()

    cfg = {}
    if args.config:
        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
    label_column = args.label_column or cfg.get("model", {}).get("label_column", "label")
    review = args.review_threshold if args.review_threshold is not None else cfg.get("engine", {}).get("review_threshold", 0.5)
    decline = args.decline_threshold if args.decline_threshold is not None else cfg.get("engine", {}).get("decline_threshold", 0.9)

    previous = None
    if args.previous and os.path.exists(args.previous):
        md = {e.key: e.value for e in onnx.load(args.previous).metadata_props}
        previous = {"version": md.get("payguard.model_version", "?"),
                    "metrics": json.loads(md.get("payguard.metrics", "{}")),
                    "features": len(json.loads(md.get("payguard.features", "[]")))}
        log(f"previous model {previous['version']} ({previous['features']} features) read from {args.previous}")

    table = pq.read_table(args.input)
    if label_column not in table.schema.names:
        sys.exit(f"{args.input}: no label column {label_column!r} (columns: {', '.join(table.schema.names)}); "
                 "replay with --labels, or name the column with --label-column / [model] label_column")
    features, types = feature_columns(table.schema, label_column, canonical_columns(table.schema, cfg))
    log(f"{table.num_rows} rows, {len(features)} features: {', '.join(features)}")
    keep = CANONICAL + ["decision", "rule_hits", label_column, "label_scenario", "label_reported_at"]
    df = table.select([c for c in dict.fromkeys(keep + features) if c in table.schema.names]).to_pandas()
    if "label_scenario" not in df:
        df["label_scenario"] = None
    df["y"] = df[label_column].astype(bool).astype(int)
    df["day"] = df["event_time"].dt.floor("D")

    # 1. Label maturity.
    last_report = df["label_reported_at"].max() if "label_reported_at" in df else df["event_time"].max()
    if pd.isna(last_report):
        last_report = df["event_time"].max()
    mature_until = (last_report - pd.Timedelta(days=args.label_maturity_days)).floor("D")
    rows_total = len(df)
    df = df[df["event_time"] < mature_until].reset_index(drop=True)
    days = sorted(df["day"].unique())
    need = args.test_days + args.gap_days + args.calibration_days + 2
    if len(days) < need:
        sys.exit(f"only {len(days)} mature days of data; the split needs at least {need} "
                 "(generate more simulated days, or lower --test-days / --gap-days / --calibration-days)")

    # 2. Time split.
    test_days = days[-args.test_days:]
    gap_days = days[-args.test_days - args.gap_days:-args.test_days] if args.gap_days else []
    cal_end = len(days) - args.test_days - args.gap_days
    cal_days = days[cal_end - args.calibration_days:cal_end]
    train_days = days[:cal_end - args.calibration_days]
    part = {
        "train": df["day"].isin(train_days), "calibration": df["day"].isin(cal_days),
        "gap": df["day"].isin(gap_days), "test": df["day"].isin(test_days),
    }
    splits = {}
    for name, mask in part.items():
        dd = {"train": train_days, "calibration": cal_days, "gap": gap_days, "test": test_days}[name]
        splits[name] = {
            "from": str(dd[0].date()) if dd else "-", "to": str(dd[-1].date()) if dd else "-",
            "days": len(dd), "rows": int(mask.sum()), "frauds": int(df.loc[mask, "y"].sum()),
        }
        log(f"{name}: {splits[name]}")
    tr, ca, te = (df[part[k]].reset_index(drop=True) for k in ("train", "calibration", "test"))
    vocab = vocabularies(tr, features, types)
    for f, values in vocab.items():
        log(f"category {f}: {len(values)} values ({', '.join(values[:8])}{', ...' if len(values) > 8 else ''})")
    Xtr, Xca, Xte = matrix(tr, features, vocab), matrix(ca, features, vocab), matrix(te, features, vocab)
    ytr, yca, yte = tr["y"].to_numpy(), ca["y"].to_numpy(), te["y"].to_numpy()
    cat_idx = [j for j, t in enumerate(types) if t == "category"]

    # 3. Models: each candidate with early stopping on the calibration days (at least --min-trees),
    # refitted with the chosen number of trees; the best calibration AP among the fast enough wins.
    def fit(leaves, depth, lr, trees):
        params = dict(
            objective="binary", n_estimators=trees, learning_rate=lr,
            num_leaves=leaves, max_depth=depth, min_child_samples=40, subsample=0.8, subsample_freq=1,
            colsample_bytree=0.8, reg_lambda=1.0, random_state=args.seed, deterministic=True,
            force_row_wise=True, n_jobs=2, verbose=-1, cat_smooth=10.0, min_data_per_group=50,
        )
        clf = lgb.LGBMClassifier(**params)
        clf.fit(Xtr, ytr, categorical_feature=cat_idx or "auto")
        return clf, params

    def onnx_of(clf):
        return convert_lightgbm(clf, initial_types=[("features", FloatTensorType([None, len(features)]))],
                                zipmap=False, target_opset=15)

    def speed_of(onx):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        one = ort.InferenceSession(onx.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = [o.name for o in one.get_outputs() if o.name != "label"]
        xb = Xte[:10000]
        one.run(out, {"features": xb})
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            one.run(out, {"features": xb})
            times.append(time.perf_counter() - t0)
        return len(xb) / float(np.median(times))

    candidates = []
    for spec in args.candidates.split(","):
        leaves, depth, lr = spec.split(":")
        leaves, depth, lr = int(leaves), int(depth), float(lr)
        most = max(min(args.trees, args.depth_budget // max(depth, 1)), 1)
        clf, params = fit(leaves, depth, lr, most)
        # Calibration AP after every tenth tree, from the staged predictions.
        ks = sorted(set(list(range(10, most + 1, 10)) + [most]))
        aps = [average_precision_score(yca, clf.predict_proba(Xca, num_iteration=k)[:, 1]) for k in ks]
        best_i, since = 0, 0
        for i in range(1, len(aps)):
            if aps[i] > aps[best_i] + 1e-5:
                best_i, since = i, 0
            else:
                since += 10
                if since >= args.patience and ks[i] >= args.min_trees:
                    break
        trees = min(max(ks[best_i], args.min_trees), most)
        clf, params = fit(leaves, depth, lr, trees)
        ap_cal = average_precision_score(yca, clf.predict_proba(Xca)[:, 1])
        speed = speed_of(onnx_of(clf))
        log(f"candidate {leaves} leaves, depth {depth}, rate {lr}: {trees} trees, calibration AP {ap_cal:.4f}, "
            f"{speed:,.0f} rows/s")
        candidates.append({"leaves": leaves, "depth": depth, "learning_rate": lr, "trees": trees,
                           "calibration_ap": ap_cal, "speed": speed, "clf": clf, "params": params})
    chosen = max(candidates, key=lambda c: (c["calibration_ap"], -c["trees"] * c["depth"]))
    clf, params, best, speed = chosen["clf"], chosen["params"], chosen["trees"], chosen["speed"]
    log(f"LightGBM: {best} trees, {params['num_leaves']} leaves, depth {params['max_depth']}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lrm = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                            LogisticRegression(max_iter=2000, C=1.0))
        # Logistic regression has no categories: their codes are left out.
        num_idx = [j for j in range(len(features)) if j not in cat_idx]
        lrm.fit(Xtr[:, num_idx], ytr)

    # 4. Calibration (Platt on log-odds of the calibration days).
    def logit(p):
        p = np.clip(p.astype(np.float32), np.float32(1e-7), np.float32(1 - 1e-7))
        return np.log(p / (np.float32(1) - p))
    a, b = platt(logit(clf.predict_proba(Xca)[:, 1]), yca)
    log(f"Platt: a={a:.4f} b={b:.4f}")

    # 5. ONNX.
    onx = calibrate_onnx(onnx_of(clf), a, b)
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    score = lambda X: sess.run(["score"], {"features": X})[0].reshape(-1)
    s_te, s_ca = score(Xte), score(Xca)
    log(f"onnxruntime, 1 thread, batch 10000: {speed:,.0f} rows/s")

    te_rules = rules_rank(te)
    lr_te = lrm.predict_proba(Xte[:, num_idx])[:, 1]
    model_metrics = evaluate(te, s_te, yte, review, decline)
    lr_metrics = evaluate(te, lr_te, yte, review, decline)
    # Rules: review = any review/decline decision (rank >= 1), decline = decline (rank >= 2).
    rules_metrics = evaluate(te, te_rules, yte, 1.0, 2.0)
    combined = at_threshold(np.maximum(te_rules >= 1.0, s_te >= review).astype(float), yte, 1.0)
    # Explanation baseline: the training median; for a category its most frequent value (code 0).
    baseline = [0.0 if j in cat_idx else
                float(np.nanmedian(Xtr[:, j])) if np.isfinite(Xtr[:, j]).any() else 0.0
                for j in range(len(features))]
    gain = clf.booster_.feature_importance(importance_type="gain")
    gain = (gain / max(gain.sum(), 1e-12)).tolist()

    model_bytes = clf.booster_.model_to_string().encode()
    digest = hashlib.sha256(model_bytes + json.dumps([a, b, features, vocab]).encode()).hexdigest()[:8]
    version = args.version or f"fraud-lgbm-{train_days[-1].strftime('%Y%m%d')}-{digest}"
    window = {"train": [splits["train"]["from"], splits["train"]["to"]],
              "calibration": [splits["calibration"]["from"], splits["calibration"]["to"]],
              "test": [splits["test"]["from"], splits["test"]["to"]]}
    def short(mm):
        return {k: mm[k] for k in ("roc_auc", "average_precision", "card_precision_top100_per_day")} | {
            "review_precision": mm["review"]["precision"], "review_recall": mm["review"]["recall"],
            "decline_precision": mm["decline"]["precision"], "decline_recall": mm["decline"]["recall"]}
    metrics_json = {"test": {"model": short(model_metrics), "logistic_regression": short(lr_metrics),
                             "rules_only": short(rules_metrics)},
                    "recall_by_scenario": model_metrics["recall_by_scenario"],
                    "calibration_mean_score": float(s_ca.mean()), "calibration_fraud_rate": float(yca.mean())}
    meta = {
        "payguard.features": json.dumps(features),
        "payguard.feature_types": json.dumps(types),
        "payguard.model_version": version,
        "payguard.label_column": label_column,
        "payguard.training_window": json.dumps(window),
        "payguard.thresholds": json.dumps({"review": review, "decline": decline}),
        "payguard.metrics": json.dumps(metrics_json, sort_keys=True),
        "payguard.baseline": json.dumps(baseline),
        "payguard.categories": json.dumps(vocab, sort_keys=True),
        "payguard.calibration": json.dumps({"method": "platt_on_logit", "a": a, "b": b}),
    }
    del onx.metadata_props[:]
    for k, v in meta.items():
        onx.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onx.graph.name = "payguard_fraud_model"  # the converter's is random: same input, same bytes
    onx.producer_name = "payguard models/train.py"
    onx.doc_string = f"Payguard fraud model {version}"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    onnx.save(onx, args.output)
    log(f"wrote {args.output} ({os.path.getsize(args.output)} bytes), version {version}")

    # 6. Parity fixture: test rows (some with NULLs put in) and Python onnxruntime's scores.
    if args.parity:
        os.makedirs(args.parity, exist_ok=True)
        rng = np.random.default_rng(args.seed)
        pos = np.flatnonzero(yte == 1)[:100]
        neg = rng.choice(np.flatnonzero(yte == 0), size=400, replace=False)
        idx = np.sort(np.concatenate([pos, neg]))
        rows = te.loc[idx, ["transaction_id"] + features].reset_index(drop=True)
        cols = {"transaction_id": pa.array(rows["transaction_id"], pa.string())}
        for j, (f, t) in enumerate(zip(features, types)):
            v = rows[f].to_numpy()
            null = np.zeros(len(rows), dtype=bool)
            null[(np.arange(len(rows)) % 37) == (j % 37)] = True  # a few NULLs in every column
            missing = lambda x: t == "category" and not isinstance(x, str)  # pandas' NaN for NULL text
            cols[f] = pa.array([None if n or missing(x) else x for x, n in zip(v.tolist(), null)],
                               type=pa.schema([table.schema.field(f)]).field(0).type)
        fx = pa.table(cols)
        Xp = matrix(fx.to_pandas(), features, vocab)
        fx = fx.append_column("expected_score", pa.array(score(Xp), pa.float32()))
        pq.write_table(fx, os.path.join(args.parity, "rows.parquet"))
        log(f"wrote {args.parity}/rows.parquet ({fx.num_rows} rows)")

    write_card(args.card, {
        "version": version, "reproduce": args.reproduce, "input_name": os.path.basename(args.input),
        "rows_total": rows_total, "label_column": label_column, "mature_until": str(mature_until),
        "last_report": str(last_report), "maturity_days": args.label_maturity_days, "splits": splits,
        "trees": best, "max_trees": args.trees, "params": params, "speed": speed, "seed": args.seed, "platt": (a, b),
        "thresholds": {"review": review, "decline": decline}, "features": features, "types": types,
        "baseline": baseline, "gain": gain, "model_metrics": model_metrics, "lr_metrics": lr_metrics,
        "rules_metrics": rules_metrics, "combined": combined, "metrics_json": metrics_json,
        "vocab": vocab, "previous": previous,
        "candidates": [{k: v for k, v in c.items() if k not in ("clf", "params")} for c in candidates],
        "depth_budget": args.depth_budget,
    })
    log(f"wrote {args.card}")
    log(f"test AP: model {model_metrics['average_precision']:.4f}, LR {lr_metrics['average_precision']:.4f}, "
        f"rules {rules_metrics['average_precision']:.4f}")


if __name__ == "__main__":
    main()
