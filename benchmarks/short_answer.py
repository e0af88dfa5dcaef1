"""Is a short-answer task a test bed on a real model? Base score, trivial policies, one-layer gains.

    OMP_NUM_THREADS=1 python benchmarks/short_answer.py --model models/smollm2-135m-instruct \\
        --task larger_of_two [--eval-size 200] [--layer 15 --steps 20 --seeds 0,1,2 --lr 1e-4]

Prints the base model's greedy held-out score with its standard error, then what trivial
policies score on the same held-out questions: the task's shortcuts (the first number, an option
by its place), the best constant answer (the train split's commonest) and the last worked
example's answer. A task is a test bed when the base is well below 1 and no trivial policy beats
it by much: a policy that learned only a shortcut then gains nothing.

With `--layer`, GRPO trains that one layer (4 prompts x 4 samples a step, `--steps` steps, at
`--lr`) once per proxy seed, and prints each run's held-out score, its gain over the base and the
gain in standard errors of the paired per-prompt difference, plus the seconds per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter

import numpy as np

from autolayer import short_answer
from autolayer.config import Config
from autolayer.loading import Workload, load_for, prepare_task
from autolayer.proxy import run_proxy
from autolayer.rollout import complete
from autolayer.scoring import Evaluation, evaluate, paired_gain


def trivial_policies(
    task: str, questions: list[str], train_answers: list[str]
) -> dict[str, list[str]]:
    """Each trivial policy's answers to `questions`."""
    spec = short_answer.TASKS[task]
    answers = {name: [shortcut(q) for q in questions] for name, shortcut in spec.shortcuts.items()}
    constant = Counter(train_answers).most_common(1)[0][0]
    answers[f"the constant {constant!r}"] = [constant] * len(questions)
    answers["the last example's answer"] = [spec.shots[-1][1]] * len(questions)
    return answers


def show_base(work: Workload) -> tuple[Evaluation, float]:
    model, tokenizer, task = work
    start = time.perf_counter()
    base = evaluate(model, tokenizer, task)
    seconds = time.perf_counter() - start
    print(f"base (greedy): {base.score:.3f} +- {base.stderr:.3f} on {len(base.outcomes)} "
          f"held-out prompts ({seconds:.0f} s)")  # fmt: skip
    sample = complete(model, tokenizer, task, list(task.eval["prompt"][:3])).texts
    for question, text in zip(task.eval["question"][:3], sample, strict=True):
        print(f"  {question!r} -> {text!r}")
    return base, seconds


def show_trivial(work: Workload, task_name: str) -> None:
    task = work.task
    questions, answers = list(task.eval["question"]), list(task.eval["answer"])
    for name, given in trivial_policies(task_name, questions, list(task.train["answer"])).items():
        score = np.mean(short_answer.short_answer_correct(given, answers))
        print(f"trivial policy, {name}: {score:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--task", default="larger_of_two", choices=sorted(short_answer.TASKS))
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--layer", type=int, default=None, help="train this layer alone")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", default="0,1,2", help="proxy seeds of the one-layer runs")
    args = parser.parse_args()
    config = Config()
    config.model.name = args.model
    config.task.name, config.task.eval_size = args.task, args.eval_size
    config.proxy = dataclasses.replace(
        config.proxy, steps=args.steps, prompts_per_step=4, num_generations=4,
        eval_every=args.steps, device="cpu",
    )  # fmt: skip
    work = load_for(config, prepare_task(config))
    print(f"{args.model} on {args.task}")
    base, eval_seconds = show_base(work)
    show_trivial(work, args.task)
    if args.layer is None:
        return
    for seed in (int(x) for x in args.seeds.split(",")):
        proxy = dataclasses.replace(config.proxy, seed=seed)
        result = run_proxy(work, proxy, [args.layer], args.lr, keep=False)
        gain, se = paired_gain(result.final.outcomes, base.outcomes)
        per_step = (result.seconds - eval_seconds) / result.steps
        print(
            f"layer {args.layer}, seed {seed}, {result.steps} steps at lr {args.lr:g}: "
            f"{result.score:.3f} +- {result.final.stderr:.3f}, gain {gain:+.3f} +- {se:.3f} "
            f"({gain / se if se else 0.0:+.1f} SE); {per_step:.1f} s/step",
            flush=True,
        )


if __name__ == "__main__":
    main()
