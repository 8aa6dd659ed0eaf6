"""#28's figures from a sweep over the reference model's six residual layers, trained and evaluated with
saesweep's own machinery: the persistence table (features of layer i found at layer j, beside chance), how
many of layer 2's features are found at its neighbours (1, 3) against the ends (0, 5), the features found at
the most other layers with their firing frequencies and how many lie along an outlier dimension, and how
often the activation match of two seeds' features is their decoder match. Reads the sweep's
evaluation/layers.json; prints tables and a `RESULT` line; asserts nothing.

The sweep of benchmarks/RESULTS.md (4× at each layer with the seed experiment's recipe, one pass over its 1M
tokens, and a second seed at layer 2; about 10 minutes on 2 cores), then its evaluation with activation
similarity (drop `trainer.max_epochs=1` for the seed experiment's three passes):
    python train.py experiment=seed_reference -m layer=0,1,2,3,4,5 dict_ratio=4 seed=0 trainer.max_epochs=1 \\
        hydra.sweep.dir=multirun/layers/seed0
    python train.py experiment=seed_reference -m layer=2 dict_ratio=4 seed=1 trainer.max_epochs=1 \\
        hydra.sweep.dir=multirun/layers/seed1
    python evaluate.py sweep_dir=multirun/layers activation_similarity=true similarity_tokens=20000
    python benchmarks/layers.py multirun/layers
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from saesweep.evaluate.layers import LAYERS_FILE, residual_order
from saesweep.evaluate.sweep import EVALUATION_DIR


def layer_of(hook_point: str) -> int:
    order = residual_order(hook_point)
    if order is None:
        raise SystemExit(f"{hook_point} is not a residual-stream hook point")
    return order[0]


def persistence_table(model: dict) -> list[str]:
    """Rows: features of the runs at hook point i; columns: the share found at hook point j (chance)."""
    table = model["persistence"]
    layers = [layer_of(h) for h in model["hook_points"]]
    lines = ["found at → " + " ".join(f"{'layer ' + str(j):>16}" for j in layers)]
    for i, row in enumerate(table["fraction"]):
        cells = []
        for j, share in enumerate(row):
            chance = table["chance_fraction"][i][j]
            cells.append(f"{'—':>16}" if i == j else f"{share:>7.1%} ({chance:>5.1%})")
        lines.append(f"layer {layers[i]} ({table['n_features'][i]:>5})" + " ".join(f"{c:>16}" for c in cells))
    return lines


def neighbours_and_ends(model: dict, layer: int = 2) -> dict[int, float]:
    """The share of `layer`'s features found at each other layer (empty when the sweep has no run there)."""
    layers = [layer_of(h) for h in model["hook_points"]]
    if layer not in layers:
        return {}
    i = layers.index(layer)
    return {layers[j]: share for j, share in enumerate(model["persistence"]["fraction"][i]) if j != i}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--top", type=int, default=10, help="top cross-layer features to print")
    args = parser.parse_args()
    layers_json = json.loads((args.sweep_dir / EVALUATION_DIR / LAYERS_FILE).read_text())
    fields = []
    for model in layers_json["models"]:
        print(f"model {model['model']}: features found (matched cosine ≥ {layers_json['found_threshold']}), "
              "share of the row's features, chance in brackets")
        print("\n".join(persistence_table(model)))
        share = neighbours_and_ends(model)
        if {0, 1, 3, 5} <= set(share):
            print(f"layer 2's features found at layers 1 and 3: {share[1]:.1%}, {share[3]:.1%}; "
                  f"at layers 0 and 5: {share[0]:.1%}, {share[5]:.1%}")
            fields += [f"layer2_found_at_{j}={share[j]:.4f}" for j in (0, 1, 3, 5)]
        top = model["top_features"][: args.top]
        print(f"\n{'run':<12} {'feature':>7} {'layer':>5} {'found at layers':<18} {'mean cos':>8} {'frequency':>10} "
              f"{'basis dim (|cos|, outlier)':>28}")
        for f in top:
            basis = f.get("basis_direction")
            where = (f"{basis['dimension']} ({basis['abs_cos']:.2f}, {'yes' if basis['outlier_dimension'] else 'no'})"
                     if basis else "not computed")
            found = ",".join(str(layer_of(h)) for h in f["found_at"])
            print(f"{f['run']:<12} {f['feature']:>7} {layer_of(f['hook_point']):>5} {found:<18} "
                  f"{f['mean_matched_cosine']:>8.3f} {f['frequency']:>10.5f} {where:>28}")
        aligned = [f["basis_direction"] for f in top if f.get("basis_direction")]
        if aligned:
            basis_cos = statistics.fmean(a["abs_cos"] for a in aligned)
            # what "largest |cos| with a basis direction" is for a direction that lies along none
            directions = torch.randn(10_000, model["d_in"], generator=torch.Generator().manual_seed(0))
            chance = float(torch.nn.functional.normalize(directions, dim=1).abs().max(dim=1).values.mean())
            print(f"largest |cos| with a basis direction: top features {basis_cos:.3f}, "
                  f"a random direction in {model['d_in']} dimensions {chance:.3f}")
            fields.append(f"top{len(top)}_on_outlier_dimension={sum(a['outlier_dimension'] for a in aligned) / len(aligned):.3f}")
            fields += [f"top{len(top)}_basis_abs_cos={basis_cos:.3f}", f"random_basis_abs_cos={chance:.3f}"]
        fields.append(f"top{len(top)}_mean_frequency={statistics.fmean(f['frequency'] for f in top):.5f}")
    similarity = layers_json.get("activation_similarity")
    if similarity:
        seeds = [p for p in similarity["pairs"] if p["relation"] == "seeds"]
        print("\nactivation similarity between two seeds (share matched at correlation ≥ "
              f"{similarity['threshold']}, chance; agreement with the decoder matching):")
        for p in seeds:
            print(f"  {p['a']} – {p['b']}: {p['share']:.1%} ({p['chance_share']:.1%}), agreement {p['agreement']:.1%}")
        if seeds:
            fields.append(f"seed_pairs_agreement={statistics.fmean(p['agreement'] for p in seeds):.4f}")
            fields.append(f"seed_pairs_similarity_share={statistics.fmean(p['share'] for p in seeds):.4f}")
        outliers = layers_json["outlier_dimensions"]["hook_points"]
        for h in outliers:
            print(f"  outlier dimensions at {h['hook_point']}: {h['dimensions']}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
