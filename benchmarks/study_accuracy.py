"""Accuracy study on frozen features: ridge vs regression vs BLEEP vs CMRCNet, ± TTA, ± context.

Every arm uses the same frozen backbone features, computed once per spot and cached:
the pooled EfficientNet-Lite0 features of the 8 symmetries of the patch (112 µm at 112 px) and
of a context field (``--context`` × the patch side, same centre, resampled to 112 px), read
with the evaluation's own ``spot_patches`` (``Slide.read_resampled``) and
``preprocess.encoder_input`` (the model's normalisation). Arms:

- ``tta``: 1 (the patch as is) or 8 (pooled features averaged over the 8 symmetries, for the
  training spots and the held-out spots alike — what a frozen-backbone model with
  ``InputSpec.tta = 8`` computes);
- ``context``: 0 or the context factor (pooled features of both fields concatenated);
- ``8>1:1`` style arms train on one TTA and predict with another (here: heads trained on the
  8-view average, held-out spots scored from the plain patch — what the live view on a CPU
  does with a ``tta = 8`` model, see ``live_view_tta``).

The heads are trained exactly like ``stpredict train --train-backbone none`` (AdamW, lr 1e-3,
weight decay 1e-3, warm-up + cosine, gradient clip 1, 20 epochs × ≤ 15 steps × 64 spots, best
epoch by the loss on a random 10 % of the training spots, seed 0, reference bank = training
spots); ridge is :func:`napari_stpredict.model.ridge.fit_ridge` (PCA 256, alpha by inner
leave-one-section-out CV on the training sections). Scores: the evaluation's
``score_section`` per held-out section, then the mean over sections of a fold and over folds.

Retrieval weighting/k is chosen on **validation sections only**: inside every outer fold one
training section (the next in manifest order) is held out as validation, the heads are trained
on the rest, and the (k, weighting) with the best validation PCC(HEG) is then used on the test
section of that fold (reported as ``*_tuned``); the plain ``k=50`` mean is reported too.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/study_accuracy.py benchmarks/data/her2st.yaml \\
        --genes ../shared/data/genelists/hist2st_her_hvg_cut_1000.npy \\
        --cache /tmp/stpredict-study --out docs/results/study_her2st.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from napari_stpredict.evaluation import BREAST_CANCER_MARKERS, make_folds, score_section
from napari_stpredict.evaluation.data import load_section, measured_expression, spot_patches
from napari_stpredict.model.methods import build_model
from napari_stpredict.model.preprocess import (
    TTA_ORDER,
    InputSpec,
    backbone_mean_std,
    dihedral,
    encoder_input,
)
from napari_stpredict.model.retrieval import topk_mean_expression
from napari_stpredict.model.ridge import fit_ridge
from napari_stpredict.st import load_gene_list, load_manifest

BACKBONE = "tf_efficientnet_lite0"
MARKERS: list[str] = list(BREAST_CANCER_MARKERS)  # --markers none: []
RETRIEVAL_GRID = [("mean", None, k) for k in (10, 25, 50, 100)] + [
    ("softmax", t, k) for t in (0.02, 0.05, 0.1) for k in (25, 50, 100)
]


def extract(manifest, genes, cache: Path, *, patch_um, patch_px, context) -> dict:
    """Per section: pooled features (8 views, 2 fields, N, C), view-0 tokens, truth, labels."""
    from napari_stpredict.model.encoders import create_encoder

    cache.mkdir(parents=True, exist_ok=True)
    enc = None
    out = {}
    mean, std = backbone_mean_std(BACKBONE)
    spec = InputSpec(patch_um=patch_um, patch_px=patch_px, mean=mean, std=std)
    for s in manifest.sections:
        f = cache / f"{s.name}-{patch_um:g}um-{patch_px}px-ctx{context:g}.npz"
        sec = load_section(s)
        truth = measured_expression(sec, genes, {"method": "log1p_cpm", "target_sum": 1e4})
        if not f.is_file():
            if enc is None:
                enc = create_encoder(BACKBONE, pretrained="offline").eval()
            t0 = time.perf_counter()
            fields = [
                spot_patches(sec, patch_um=patch_um * m, patch_px=patch_px) for m in (1.0, context)
            ]
            pooled = np.zeros((8, 2, len(sec.xy), enc.num_features), np.float32)
            tokens = None
            with torch.inference_mode():
                for vi, k in enumerate(TTA_ORDER):
                    for fi, u8 in enumerate(fields):
                        for a in range(0, len(u8), 64):
                            x = encoder_input(dihedral(u8[a : a + 64], k, dims=(-3, -2)), spec)
                            tok, pool = enc(x)
                            pooled[vi, fi, a : a + 64] = pool.numpy()
                            if vi == 0 and fi == 0:
                                if tokens is None:
                                    tokens = np.zeros((len(u8), *tok.shape[1:]), np.float16)
                                tokens[a : a + 64] = tok.numpy().astype(np.float16)
            np.savez(f, pooled=pooled, tokens=tokens)
            print(f"{s.name}: {len(sec.xy)} spots, features in {time.perf_counter() - t0:.0f} s")
        d = np.load(f)
        out[s.name] = {
            "pooled": d["pooled"],
            "tokens": d["tokens"],
            "truth": truth,
            "labels": sec.labels,
            "xy": sec.xy,
            "patient": s.patient,
        }
    return out


def features(sec: dict, *, tta: int, context: bool) -> np.ndarray:
    p = sec["pooled"][:tta].mean(0)  # (2, N, C)
    return np.concatenate([p[0], p[1]], 1) if context else p[0]


def _lr(step, total, warmup):
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))


def train_head(method, x, tokens, y, *, n_fields, seed=0, epochs=20, steps=15, bs=64):
    """The training loop of ``--train-backbone none`` on given features; returns the model,
    the indices of the bank (training minus validation spots)."""
    torch.manual_seed(seed)
    model = build_model(method, n_genes=y.shape[1], backbone=BACKBONE, n_fields=n_fields)
    n = len(x)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = round(n * 0.1)
    val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    X, T, Y = torch.from_numpy(x), torch.from_numpy(tokens.astype(np.float32)), torch.from_numpy(y)
    heads = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    opt = torch.optim.AdamW(heads, lr=1e-3, weight_decay=1e-3)
    bsz = min(bs, len(tr))
    spe = min(max(1, len(tr) // bsz), steps)
    total = epochs * spe
    warm = min(100, total // 10)
    best, best_state, step = float("inf"), None, 0
    for ep in range(epochs):
        model.train()
        order = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(ep)).numpy()]
        for s in range(spe):
            idx = torch.from_numpy(order[s * bsz : (s + 1) * bsz])
            for g in opt.param_groups:
                g["lr"] = 1e-3 * _lr(step, total, warm)
            loss = model.loss_from_features(T[idx], X[idx], Y[idx])["loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads, 1.0)
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            v = torch.from_numpy(val)
            vl = float(model.loss_from_features(T[v], X[v], Y[v])["loss"])
        if vl < best:
            best = vl
            best_state = {k: t.clone() for k, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), tr


def predict_head(model, bank_idx, x_tr, y_tr, x_te, settings):
    """Predictions for each retrieval setting (one for regression)."""
    with torch.no_grad():
        X = torch.from_numpy(x_te)
        emb = model.image_from_features(X[:, None], X).float()
        if not model.retrieval:
            return {"-": emb.numpy()}
        bank_y = torch.from_numpy(y_tr[bank_idx])
        bank_e = model.encode_expr(bank_y).float()
        return {
            f"{w}:{t}:{k}": topk_mean_expression(
                emb, bank_e, bank_y, k=k, weighting=w, temperature=t or 0.05
            ).numpy()
            for w, t, k in settings
        }


def score(secs, names, preds, genes):
    """Mean over held-out sections of each metric."""
    ms = []
    for name in names:
        s = secs[name]
        ms.append(
            score_section(
                s["truth"],
                preds[name],
                genes,
                section=name,
                markers=MARKERS,
                labels=s["labels"],
            ).metrics
        )
    keys = ms[0].keys()
    return {k: float(np.nanmean([m[k] for m in ms])) for k in keys}


def fit_predict(method, secs, train, test, *, tta, ctx, settings, test_tta=None):
    """{setting: {section: pred}} of one method trained on ``train`` sections."""
    test_tta = tta if test_tta is None else test_tta
    xtr = np.concatenate([features(secs[n], tta=tta, context=ctx) for n in train])
    ytr = np.concatenate([secs[n]["truth"] for n in train])
    out: dict[str, dict[str, np.ndarray]] = {}
    if method == "ridge":
        groups = np.concatenate([[i] * len(secs[n]["truth"]) for i, n in enumerate(train)])
        fit = fit_ridge(xtr, ytr, groups=groups)
        out["-"] = {n: fit.predict(features(secs[n], tta=test_tta, context=ctx)) for n in test}
        return out, {"alpha_relative": fit.alpha_rel}
    ttr = np.concatenate([secs[n]["tokens"] for n in train])
    model, bank = train_head(method, xtr, ttr, ytr, n_fields=2 if ctx else 1)
    for n in test:
        for key, p in predict_head(
            model, bank, xtr, ytr, features(secs[n], tta=test_tta, context=ctx), settings
        ).items():
            out.setdefault(key, {})[n] = p
    return out, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest")
    ap.add_argument("--genes", required=True)
    ap.add_argument("--cache", default="/tmp/stpredict-study")
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=float, default=3.0)
    ap.add_argument("--methods", default="ridge,regression,bleep,cmrc")
    ap.add_argument("--cv", default="leave-one-section-out,leave-one-patient-out")
    ap.add_argument(
        "--arms",
        default="1:0,8:0,1:1,8:1",
        help="tta:context pairs; 'train>test:context' trains and predicts with different TTA",
    )
    ap.add_argument("--markers", default="breast", choices=["breast", "none"])
    ap.add_argument(
        "--merge", action="store_true", help="keep the runs already in --out (add/replace arms)"
    )
    ap.add_argument(
        "--tune",
        default="all",
        help="arms (tta:context, comma-separated) whose retrieval k/weighting is chosen on "
        "validation sections ('all', or '' for none)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    global MARKERS
    MARKERS = [] if args.markers == "none" else MARKERS
    for method in args.methods.split(","):  # import every module now (a long run must not
        build_model(method, n_genes=2, backbone=BACKBONE)  # pick up half-edited source later)
    m = load_manifest(args.manifest)
    genes = None if args.genes == "all" else load_gene_list(args.genes)
    t0 = time.perf_counter()
    # genes measured in every section (the evaluation's panel rule)
    from napari_stpredict.st import read_sections, select_genes

    genes = select_genes(read_sections(m), gene_list=genes, missing="drop")
    secs = extract(m, genes, Path(args.cache), patch_um=112.0, patch_px=112, context=args.context)
    names = [s.name for s in m.sections]
    results: dict = {
        "config": {
            "manifest": args.manifest,
            "genes": len(genes),
            "context": args.context,
            "backbone": BACKBONE,
            "patch": "112 µm at 112 px",
            "retrieval_grid": RETRIEVAL_GRID,
        },
        "runs": {},
    }
    if args.merge and Path(args.out).is_file():
        results["runs"] = json.loads(Path(args.out).read_text())["runs"]
    arms = []
    for a in args.arms.split(","):
        tta_s, ctx_s = a.split(":")
        train_tta, _, test_tta = tta_s.partition(">")
        arms.append((int(train_tta), int(test_tta or train_tta), int(ctx_s)))
    for cv in args.cv.split(","):
        folds = make_folds(m.sections, cv=cv)
        for tta, test_tta, ctx in arms:
            for method in args.methods.split(","):
                tta_label = f"{tta}" if test_tta == tta else f"{tta}>{test_tta}"
                label = f"{cv}|{method}|tta{tta_label}|ctx{args.context if ctx else 0:g}"
                per_fold = []
                for fold in folds:
                    train = [n for n in names if n in fold.train]
                    test = list(fold.test)
                    settings = [("mean", None, 50)]
                    chosen = "mean:None:50"
                    tune = args.tune == "all" or f"{tta}:{ctx}" in args.tune.split(",")
                    if tune and method in ("bleep", "cmrc") and len(train) >= 2:
                        # validation-only choice of (weighting, T, k)
                        val = train[(names.index(train[-1]) + 1) % len(train)]
                        inner = [n for n in train if n != val]
                        vp, _ = fit_predict(
                            method, secs, inner, [val], tta=tta, ctx=ctx, settings=RETRIEVAL_GRID
                        )
                        vs = {key: score(secs, [val], p, genes)["pcc_heg"] for key, p in vp.items()}
                        chosen = max(vs, key=vs.get)
                        w, t, k = chosen.split(":")
                        settings = [
                            ("mean", None, 50),
                            (w, None if t == "None" else float(t), int(k)),
                        ]
                    preds, extra = fit_predict(
                        method,
                        secs,
                        train,
                        test,
                        tta=tta,
                        ctx=ctx,
                        settings=settings,
                        test_tta=test_tta,
                    )
                    row = {"test": test, **extra}
                    key0 = "-" if method in ("ridge", "regression") else "mean:None:50"
                    row["default"] = score(secs, test, preds[key0], genes)
                    if len(settings) > 1:
                        row["tuned_setting"] = chosen
                        row["tuned"] = score(secs, test, preds[chosen], genes)
                    per_fold.append(row)
                summ = {}
                for which in ("default", "tuned"):
                    if all(which in f for f in per_fold):
                        ks = per_fold[0][which].keys()
                        summ[which] = {
                            k: [
                                float(np.nanmean([f[which][k] for f in per_fold])),
                                float(np.nanstd([f[which][k] for f in per_fold], ddof=1)),
                            ]
                            for k in ks
                        }
                results["runs"][label] = {"summary": summ, "folds": per_fold}
                d = summ["default"]["pcc_heg"][0]
                tn = summ.get("tuned", {}).get("pcc_heg", [float("nan")])[0]
                print(
                    f"{label:60s} HEG {d:.3f} tuned {tn:.3f}  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
                Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
