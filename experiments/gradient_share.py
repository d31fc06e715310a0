"""How much each CIPL loss term moves the features: the share of the gradient at the feature map z.

    python -m experiments.gradient_share runs/RUN            # its checkpoints/last.pt
    python -m experiments.gradient_share CKPT.pt --batches 16

A loss term can only change what the prototypes learn through the gradient it sends into the feature
map z = add_on(top_layer(backbone(x))). For paired training batches drawn exactly as in the paired
stage (class-balanced pairs, two views each, the model in training mode), this measures, per weighted
term w_t L_t: its value, the norm of d(w_t L_t)/dz over the batch, its share of the sum of those norms,
and the cosine between its gradient and that of L_cls. A term whose share is a fraction of a percent
cannot change the model whatever the paper's equation says.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import losses
from datasets import ClassBalancedSampler, PairedTwoViewDataset, TwoViewTransform, build_datasets, unpack_pairs
from model import EmaTeacher, build_model
from settings import Config
from utils.checkpoint import load_checkpoint
from utils.training import loss_weights, paired_terms_of, seed_everything

logger = logging.getLogger("cipl.gradient_share")


def measure_gradient_shares(run: str | Path, batches: int = 8, seed: int = 1234) -> dict:
    """Per loss term: mean weighted value, mean gradient norm at z, mean share and mean cosine with L_cls's
    gradient, over ``batches`` paired batches. All CIPL terms are measured, whichever the run trained with."""
    state = load_checkpoint(run)  # a run directory means its checkpoints/last.pt
    config = Config.from_dict(state["config"])
    config.cross_image = config.interpretation_alignment = config.prediction_alignment = True
    seed_everything(seed)
    train = build_datasets(config).train
    model = build_model(config, load_pretrained=False)
    model.load_state_dict(state["model"])
    teacher = EmaTeacher(model, config.ema_decay)
    if state.get("teacher") is not None:
        teacher.load_state_dict(state["teacher"])
    model.train()
    weights = loss_weights(config)
    sampler = ClassBalancedSampler(train.targets, num_samples=batches * config.batch_size, cap=config.class_weight_cap,
                                   no_finding_multiplier=config.no_finding_weight_paired, paired=True, seed=seed)
    loader = DataLoader(PairedTwoViewDataset(train, TwoViewTransform(config)), batch_size=config.batch_size,
                        sampler=sampler, drop_last=True)
    names = list(losses.PAIRED_TERMS)
    values, norms, cosines = [], [], []
    for batch in loader:
        views, views_prime, targets, _ = unpack_pairs(batch)
        output = model(views, co_attend=True)
        terms = paired_terms_of(output, teacher(views_prime), targets, config, model.prototype_class)
        gradients = []
        for name in names:
            weighted = terms[name] * getattr(weights, name)
            (gradient,) = torch.autograd.grad(weighted, output.features, retain_graph=True, allow_unused=True)
            gradients.append(torch.zeros_like(output.features) if gradient is None else gradient)
        flat = torch.stack([g.flatten() for g in gradients]).double()  # [terms, N*D*H*W]
        norm = flat.norm(dim=1)
        reference = flat[names.index("classification")]
        cosine = (flat @ reference) / (norm * reference.norm()).clamp_min(1e-30)
        values.append([float(terms[name].detach()) * getattr(weights, name) for name in names])
        norms.append(norm.tolist())
        cosines.append(cosine.tolist())
    if not values:
        raise ValueError(f"no batch of {config.batch_size} pairs could be drawn from the training split")
    values, norms, cosines = np.array(values), np.array(norms), np.array(cosines)
    shares = norms / norms.sum(axis=1, keepdims=True)
    return dict(
        run=str(run), batches=len(values), terms=names,
        weighted_value=values.mean(axis=0).tolist(), gradient_norm=norms.mean(axis=0).tolist(),
        share=shares.mean(axis=0).tolist(), cosine_with_classification=cosines.mean(axis=0).tolist(),
    )


def format_shares(measurements: list[dict]) -> str:
    """Markdown table of the mean over several runs' measurements (one run is fine too)."""
    names = measurements[0]["terms"]

    def mean(key: str) -> np.ndarray:
        return np.mean([m[key] for m in measurements], axis=0)

    value, norm, share, cosine = mean("weighted_value"), mean("gradient_norm"), mean("share"), mean("cosine_with_classification")
    lines = ["| term | weighted value | gradient norm at z | share of the gradient | cosine with L_cls's gradient |",
             "|---|---|---|---|---|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | {value[i]:.4g} | {norm[i]:.3g} | {100 * share[i]:.2f} % | {cosine[i]:+.3f} |")
    lines.append(f"\n({len(measurements)} run(s), {measurements[0]['batches']} paired batches each)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.gradient_share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (their checkpoints/last.pt) or checkpoint files")
    parser.add_argument("--batches", type=int, default=8, help="paired batches to average over (default 8)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.batches < 1:
        print("experiments.gradient_share: error: --batches must be at least 1", file=sys.stderr)
        return 2
    try:
        measurements = [measure_gradient_shares(run, args.batches) for run in args.runs]
    except (FileNotFoundError, ValueError) as error:
        print(f"experiments.gradient_share: error: {error}", file=sys.stderr)
        return 2
    print(format_shares(measurements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
