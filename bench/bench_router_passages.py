"""MoA's routers on prompts about other things than their training prompts (issue 28), side by side in one run.
Run: python -m bench.bench_router_passages [--train 64] [--test 48]

SmolLM2-135M-Instruct's mean-pooled block inputs (the base model's) of the six synthetic tasks' prompts. qa's
training prompts are about one kind of entity (people, towns, companies, species: the passage's subject), its test
prompts about another kind, the same template: as SQuAD's test articles are other articles than its training
ones. For each of the 12 (train kind, test kind) pairs, three rules route the held-out prompts of every task:
- fit_routers (routers mode as moa trains them: anchored at the centroid rule, augmented with other passages);
- the plain fit it replaced: the same routers, optimizer, schedule and steps from a random start on the
  cross-entropy alone;
- the training-free nearest-centroid rule (moa's `centroid` router).
Printed: the last block's accuracy on qa's held-out prompts and on all six tasks', per pair and on average.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import device_label

KINDS = ("person", "town", "company", "species")


def kind_of(row: dict) -> str:
    """The kind of entity a synthetic qa passage is about, from its first sentence (moa.data.synthetic.qa)."""
    first = row["context"].split(". ", 1)[0]
    if " was born in " in first:
        return "person"
    if " is a small town " in first:
        return "town"
    return "company" if " company founded in " in first else "species"


def features(train: int, test: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every group's pooled base features [L, D, H]: each task's train and test prompts, qa's by kind."""
    from moa.data import synthetic
    from moa.data.tasks import get_task
    from moa.experiment import load_config
    from moa.model import load_pretrained
    from moa.routing import pooled_features

    config = load_config("config/config.yaml")
    model, tokenizer = load_pretrained()
    limit = config["data"]["max_prompt_tokens"]

    def encode(task: str, rows: list[dict]) -> list[list[int]]:
        return [tokenizer.encode(get_task(config, task).prompt(row))[:limit] for row in rows]

    groups = {}
    for task in config["tasks"]:
        if task == "qa":
            for split, n in (("train", train), ("test", test)):
                rows = synthetic.generate("qa", 20 * n, 0, split)
                groups |= {f"qa_{split}_{kind}": encode("qa", [r for r in rows if kind_of(r) == kind][:n])
                           for kind in KINDS}
        else:
            groups |= {f"{task}_{split}": encode(task, synthetic.generate(task, n, 0, split))
                       for split, n in (("train", train), ("test", test))}
    model.eval()
    return list(config["tasks"]), {name: pooled_features(model, prompts) for name, prompts in groups.items()}


def stacked(groups: dict[str, torch.Tensor], tasks: list[str], split: str, qa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's features [L, D, H] with qa's of kind `qa`, and their tasks [D]."""
    parts = [groups[f"qa_{split}_{qa}" if task == "qa" else f"{task}_{split}"] for task in tasks]
    labels = torch.cat([torch.full((part.shape[1],), i) for i, part in enumerate(parts)])
    return torch.cat(parts, 1), labels


def plain_fit(routers, features: list[torch.Tensor], tasks: torch.Tensor, settings) -> None:
    """The fit fit_routers replaced: cross-entropy alone from the routers' random start."""
    from moa.train.router import routing_loss
    from moa.train.trainer import clip_and_step, optimizer_for

    params = list(routers.parameters())
    optimizer, scheduler = optimizer_for(params, settings, settings.steps)
    weight = torch.bincount(tasks).float().reciprocal()
    for _ in range(settings.steps):
        routing_loss(routers(features), tasks, weight).backward()
        clip_and_step(params, optimizer, settings)
        scheduler.step()


def accuracies(predicted: torch.Tensor, truth: torch.Tensor, qa: int) -> tuple[float, float]:
    return (predicted[truth == qa] == qa).float().mean().item(), (predicted == truth).float().mean().item()


def compare(tasks: list[str], groups: dict[str, torch.Tensor], train_kind: str, test_kind: str,
            settings) -> dict[str, tuple[float, float]]:
    """(qa accuracy, accuracy over all tasks) of the last block's routing by each rule."""
    import torch.nn.functional as F

    from moa.routing import LayerRouters, RouterSpec
    from moa.train.router import fit_routers

    x_train, y_train = stacked(groups, tasks, "train", train_kind)
    x_test, y_test = stacked(groups, tasks, "test", test_kind)
    spec = RouterSpec("linear", "mean", x_train.shape[0], x_train.shape[-1], tuple(tasks))
    qa, out = tasks.index("qa"), {}
    for name in ("fit_routers", "plain fit"):
        torch.manual_seed(0)
        routers = LayerRouters(spec)
        if name == "fit_routers":
            fit_routers(routers, list(x_train), y_train, settings, eta=1.0)
        else:
            plain_fit(routers, list(x_train), y_train, settings)
        with torch.no_grad():
            out[name] = accuracies(routers(list(x_test))[-1].argmax(-1), y_test, qa)
    centroids = F.normalize(torch.stack([x_train[-1, y_train == k].mean(0) for k in range(len(tasks))]), dim=-1)
    out["centroid"] = accuracies((x_test[-1] @ centroids.T).argmax(-1), y_test, qa)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=64, help="training prompts per task (config: router.prompts_per_task)")
    parser.add_argument("--test", type=int, default=48, help="held-out prompts per task")
    args = parser.parse_args()
    from moa.experiment import load_config
    from moa.train.router import router_settings

    settings = router_settings(load_config("config/config.yaml"))
    tasks, groups = features(args.train, args.test)
    rules = ("fit_routers", "plain fit", "centroid")
    print(f"\nLast block's routing accuracy, qa trained on one kind of passage, tested on another; {args.train} "
          f"training and {args.test} held-out prompts per task  [{device_label()}]")
    print("| qa train -> test     | " + " | ".join(f"{r:>10} qa / all" for r in rules) + " |")
    print("|" + "---|" * (len(rules) + 1))
    total = {rule: [0.0, 0.0] for rule in rules}
    pairs = [(a, b) for a in KINDS for b in KINDS if a != b]
    for train_kind, test_kind in pairs:
        got = compare(tasks, groups, train_kind, test_kind, settings)
        for rule in rules:
            total[rule] = [t + v / len(pairs) for t, v in zip(total[rule], got[rule])]
        print(f"| {train_kind:>7} -> {test_kind:<8} | "
              + " | ".join(f"{got[r][0]:>10.3f} / {got[r][1]:.3f}" for r in rules) + " |", flush=True)
    print("| mean                 | " + " | ".join(f"{total[r][0]:>10.3f} / {total[r][1]:.3f}" for r in rules) + " |")


if __name__ == "__main__":
    main()
