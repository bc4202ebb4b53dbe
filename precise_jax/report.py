"""Run reports: one folder per run holding results.json, report.md (tables) and PNG plots, written atomically.

    report = Report("runs/shield-1")                      # refuses an existing, non-empty folder unless overwrite=True
    report.table("Attack success rate", *before_after_rows(asr))
    report.table("Utility cost on benign text", *utility_rows(cost))
    report.figure("asr", plot_before_after, asr, metric="attack success rate")
    report.write(results)                                 # results.json + report.md, then the folder appears whole

Everything is built in a hidden sibling folder and renamed into place by `write`; an exception (or a kill) before
that leaves no folder under the final name, so a folder that exists is complete. Plots render with matplotlib's
headless Agg backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ports.errors import InputError
from precise_jax.outputs import OutputDir, to_json  # noqa: F401  (to_json: report.to_json stays importable)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from numpy.typing import ArrayLike

    from precise_jax.evaluate import UtilityCost
    from precise_jax.neurons import NeuronSet
    from precise_jax.shield import Located

# ----------------------------------------------------------------------------------------------------- report


class Report:
    """A run's report folder: add tables, text and figures in order, then `write` it atomically."""

    def __init__(self, path: str | os.PathLike, *, title: str = "precise-jax report", overwrite: bool = False):
        self.output = OutputDir(path, overwrite)
        self.sections: list[str] = [f"# {title}\n"]
        self.figures: dict[str, Path] = {}

    @property
    def folder(self) -> Path:
        """The work folder: put any other files of the run here (they move with the report)."""
        return self.output.path

    @property
    def path(self) -> Path:
        """Where the report will be once written."""
        return self.output.final

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip() + "\n")

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str | None = None) -> str:
        """Append a Markdown table (cells: str, numbers, or Estimates shown as "value [low, high]"); returns it."""
        if not rows:
            raise InputError(f"table {title!r} has no rows")
        bad = [n for n, row in enumerate(rows) if len(row) != len(headers)]
        if bad:
            raise InputError(f"table {title!r}: rows {bad} do not have {len(headers)} cells ({list(headers)})")
        lines = [f"## {title}\n", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
        if note:
            lines += ["", note.strip()]
        block = "\n".join(lines) + "\n"
        self.sections.append(block)
        return block

    def figure(self, name: str, plot: Callable, *args, size: tuple[float, float] = (6.4, 4.0), dpi: int = 100,
               caption: str | None = None, **kwargs) -> Path:
        """Draw plot(ax, *args, **kwargs) on a new figure of `size` inches and save it as `name`.png."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if not name or "/" in name or name.startswith("."):
            raise InputError(f"figure name {name!r} must be a plain file name (no folders, not hidden)")
        if name in self.figures:
            raise InputError(f"the report already has a figure named {name!r}")
        fig, ax = plt.subplots(figsize=size, dpi=dpi)
        try:
            plot(ax, *args, **kwargs)
            fig.tight_layout()
            path = self.folder / f"{name}.png"
            fig.savefig(path, dpi=dpi)
        finally:
            plt.close(fig)
        self.figures[name] = path
        self.sections.append(f"![{caption or name}]({name}.png)\n" + (f"\n*{caption}*\n" if caption else ""))
        return path

    def markdown(self) -> str:
        return "\n".join(self.sections)

    def write(self, results: Mapping) -> Path:
        """results.json and report.md into the folder, which then appears under its final name; returns that."""
        self.output.check_open()
        try:
            (self.folder / "report.md").write_text(self.markdown(), encoding="utf-8")
            return self.output.commit(results, "results.json")
        finally:
            self.output.discard()

    def discard(self) -> None:
        self.output.discard()

    def __enter__(self) -> "Report":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.output.discard()  # after write this does nothing; after an error it leaves nothing behind


def as_estimate(value: Any) -> Any:
    """An evaluate.Estimate from itself or from its results.json form ({"value", "low", "high", "n", ...})."""
    from precise_jax.evaluate import Estimate

    if isinstance(value, Mapping) and {"value", "low", "high", "n"} <= set(value):
        return Estimate(**{k: value[k] for k in ("value", "low", "high", "n", "confidence") if k in value})
    return value


def _cell(value: Any) -> str:
    value = as_estimate(value)
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------------- tables


def before_after_rows(comparison: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list]]:
    """(headers, rows) of {condition: {"before", "after", "change"}} (see evaluate.before_after_by_condition)."""
    if not comparison:
        raise InputError("no conditions to tabulate")
    rows = []
    for name, parts in comparison.items():
        before, after, change = (as_estimate(parts[k]) for k in ("before", "after", "change"))
        rows.append([name, before.n, before, after, change])
    level = as_estimate(next(iter(comparison.values()))["before"]).confidence
    return ["condition", "n", f"before [{level:.0%} CI]", f"after [{level:.0%} CI]", "change (paired)"], rows


def utility_rows(cost: UtilityCost) -> tuple[list[str], list[list]]:
    """(headers, rows) of an evaluate.UtilityCost."""
    return ["measure", f"value [{cost.kl.confidence:.0%} CI]"], [
        ["next-token KL(original ‖ modified), nats", cost.kl],
        ["perplexity, original", cost.perplexity_original],
        ["perplexity, modified", cost.perplexity_modified],
        ["perplexity ratio (modified / original)", cost.perplexity_ratio],
        ["tokens scored", cost.tokens],
    ]


# ----------------------------------------------------------------------------------------------------- plots
# Each takes a matplotlib Axes first, so Report.figure (or a notebook) decides the figure.


def plot_neurons_per_layer(ax: Axes, neurons: NeuronSet | Mapping[str, NeuronSet], label: str | None = None) -> None:
    """Bar chart of a NeuronSet's neurons per layer (or several sets, {name: NeuronSet}, side by side)."""
    sets = neurons if isinstance(neurons, Mapping) else {label or "neurons": neurons}
    if not sets:
        raise InputError("no neuron sets to plot")
    width = 0.8 / len(sets)
    for k, (name, s) in enumerate(sets.items()):
        layers = np.arange(s.num_layers)
        ax.bar(layers + (k - (len(sets) - 1) / 2) * width, s.per_layer(), width, label=f"{name} ({len(s)})")
    ax.set_xlabel("layer")
    ax.set_ylabel("safety neurons")
    ax.legend(fontsize="small")


def plot_overlap(ax: Axes, sets: Mapping[str, NeuronSet]) -> None:
    """Heatmap of the pairwise Jaccard overlaps of named neuron sets (e.g. one per condition)."""
    from precise_jax.neurons import overlap_matrix

    if len(sets) < 2:
        raise InputError("an overlap heatmap needs at least two neuron sets")
    names, matrix = overlap_matrix(sets)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(names)), names, fontsize="small")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize="x-small",
                    color="black" if matrix[i, j] > 0.6 else "white")
    ax.figure.colorbar(image, ax=ax, label="Jaccard overlap")


def plot_before_after(ax: Axes, comparison: Mapping[str, Mapping[str, Any]], metric: str = "rate") -> None:
    """Grouped bars of a metric before and after per condition, with the bootstrap intervals as error bars."""
    if not comparison:
        raise InputError("no conditions to plot")
    names = list(comparison)
    x = np.arange(len(names))
    for offset, when in ((-0.2, "before"), (0.2, "after")):
        est = [as_estimate(comparison[n][when]) for n in names]
        values = np.array([e.value for e in est])
        errors = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
        ax.bar(x + offset, values, 0.4, yerr=np.maximum(errors, 0), capsize=3, label=when)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(metric)
    ax.legend()


def plot_spectrum(ax: Axes, eigenvalues: ArrayLike, k: int | None = None, label: str | None = None) -> None:
    """Generalized eigenvalues, largest first, on a log scale; the first `k` (the kept subspace) marked."""
    values = np.sort(np.asarray(eigenvalues, np.float64).ravel())[::-1]
    if values.size == 0:
        raise InputError("no eigenvalues to plot")
    ax.plot(np.arange(1, values.size + 1), values, marker=".", label=label)
    if k:
        ax.axvline(k + 0.5, color="gray", linestyle="--", label=f"kept: {k}")
    if np.all(values > 0):
        ax.set_yscale("log")
    ax.set_xlabel("component")
    ax.set_ylabel("eigenvalue (malicious / benign variance)")
    if k or label:
        ax.legend()


# ----------------------------------------------------------------------------------------------------- Precise Shield


def plot_losses(ax: Axes, losses: Mapping[str, Sequence[float]]) -> None:
    """Training loss per step of each run ({name: [loss, ...]})."""
    if not losses:
        raise InputError("no training runs to plot")
    for name, values in losses.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss on reply tokens (nats)")
    ax.legend()


CAUSAL_NOTE = ("The sequence refusal score is log p(complete refusal continuations) - log p(compliance openings) "
               "at the first reply position, teacher-forced; the first-token score (the older one) is the log-odds "
               "of refusal-opening tokens there. The "
               "neurons are causal for refusal when editing them moves it more than editing random sets does: "
               "zeroing should lower refusal (it cannot when the model hardly refuses to begin with), amplifying "
               "(x2) should raise it.")


def shield_report(report: Report, results: Mapping, located: Located | None = None, *, examples: int = 3) -> None:
    """The tables and plots of a Precise Shield run (`precise_jax.shield.run_pipeline`'s results) into `report`:
    headline, data, safety neurons (per layer, overlap across conditions), causal check, training, refusal and
    attack success before/after per condition with paired intervals, utility cost, and example responses."""
    evaluation, neurons, checks = results["evaluation"], results["neurons"], results["causal_check"]
    trained = [name for name in evaluation if name != "original"]
    headline = [f"- model: `{results['model']}`; conditions: {', '.join(results['conditions'])}",
                f"- {neurons['count']} safety neurons ({100 * neurons['parameter_fraction']:.3f} % of the parameters "
                "are trainable in the aligned run)"]
    for name in trained:
        e = evaluation[name]
        harmful, benign = e["harmful_refusal"]["all"], e["benign_refusal"]["all"]
        probes = e.get("over_refusal_probes", {}).get("all")
        judged = e.get("judged_attack_success", {}).get("all")
        headline.append(
            f"- **{name}**: held-out harmful refusal {as_estimate(harmful['before'])} -> "
            f"{as_estimate(harmful['after'])}; attack success {as_estimate(e['attack_success']['all']['before'])} "
            f"-> {as_estimate(e['attack_success']['all']['after'])}; benign refusal {as_estimate(benign['before'])} "
            f"-> {as_estimate(benign['after'])}"
            + (f"; over-refusal of {probes['after']['n']} probes (benign prompts that look harmful) "
               f"{as_estimate(probes['before'])} -> {as_estimate(probes['after'])}" if probes else "")
            + (f"; attack success by the {results['judges']['judged_attack_success']} "
               f"{as_estimate(judged['before'])} -> {as_estimate(judged['after'])}" if judged else "")
            + f"; next-token KL to the original on benign replies {as_estimate(e['utility']['kl'])} nats")
    judge = results.get("judges", {}).get("judged_attack_success")
    report.text(f"Refusal is judged by the multilingual refusal-keyword judge (`precise_jax.evaluate`; "
                f"{judge_agreement()})"
                + (f"; \"judged attack success\" by the {judge} on the same harmful replies" if judge else "")
                + "; intervals are 95 % percentile-bootstrap intervals over prompts, changes are paired.\n\n"
                + "\n".join(headline))

    data = results["data"]
    report.table("Data", ["part", "prompts"], [
        ["harmful prompts for locating and training", data["harmful_fit"]],
        ["harmful prompts held out", data["harmful_held_out"]],
        ["benign prompts for locating and training", data["benign_fit"]],
        ["benign prompts held out", data["benign_held_out"]],
        ["training pairs (harmful -> refusal, benign -> reference answer)", data["training_pairs"]],
    ], note=f"sources: {', '.join(data['sources'])}")

    report.table("Safety neurons", ["set", "neurons"],
                 [[f"condition {name}", count] for name, count in neurons["per_condition"].items()]
                 + [["combined (used below)", neurons["count"]]])
    if located is not None:
        sets = dict(located.per_condition)
        if len(sets) > 1:
            sets["combined"] = located.neurons
        report.figure("neurons_per_layer", plot_neurons_per_layer, sets, size=(8, 3.5),
                      caption="Safety neurons per layer")
        if len(located.per_condition) > 1:
            report.figure("neuron_overlap", plot_overlap, located.per_condition,
                          caption="Jaccard overlap of the conditions' safety neurons")

    for kind, check in checks.items():
        random = check["random_summary"]
        report.table(f"Causal check: {kind} the safety neurons, {check['examples']} held-out harmful prompts",
                     ["edit", "refusal rate [95% CI]", "sequence refusal score", "first-token score"], [
                         ["none", check["unedited"]["refusal_interval"], f"{check['unedited']['refusal_score']:.3f}",
                          f"{check['unedited']['refusal_logit']:.3f}"],
                         [f"{kind}: safety neurons ({check['neurons']})",
                          check["safety_neurons"]["refusal_interval"],
                          f"{check['safety_neurons']['refusal_score']:.3f}",
                          f"{check['safety_neurons']['refusal_logit']:.3f}"],
                         [f"{kind}: random sets of the same size per layer (mean ± sd of {len(check['random'])})",
                          f"{random['refusal_rate_mean']:.3f} ± {random['refusal_rate_std']:.3f}",
                          f"{random['refusal_score_mean']:.3f} ± {random['refusal_score_std']:.3f}",
                          f"{random['refusal_logit_mean']:.3f} ± {random['refusal_logit_std']:.3f}"],
                     ], note=CAUSAL_NOTE)

    training = results["training"]
    report.table("Alignment training", ["run", "mode", "neurons", "trainable parameters", "fraction", "steps",
                                        "chosen step (validation)", "loss first -> last", "seconds"],
                 [[name, t["mode"], t["neurons"], t["trainable"], f"{100 * t['trainable_fraction']:.4f} %",
                   t["steps"], _chosen(t), f"{t['loss_first']:.3f} -> {t['loss_last']:.3f}", t["seconds"]]
                  for name, t in training.items()],
                 note="With validation, training stops at the first check whose validation replies meet both targets "
                      "(harmful refusal and benign refusal), else keeps the check with the largest margin.")
    report.figure("training_loss", plot_losses, {name: t["losses"] for name, t in training.items()},
                  caption="Alignment loss per step")

    for name in trained:
        for metric, title in (("attack_success", "attack success rate (not refused)"),
                              ("judged_attack_success", f"attack success judged by the {judge}"),
                              ("harmful_refusal", "refusal of held-out harmful prompts"),
                              ("benign_refusal", "refusal of held-out benign prompts (over-refusal)"),
                              ("over_refusal_probes", "refusal of over-refusal probes (benign prompts that look "
                                                      "harmful: XSTest's safe prompts, borderline-benign)")):
            if metric in evaluation[name]:
                report.table(f"{name}: {title}", *before_after_rows(evaluation[name][metric]))
        report.figure(f"{name.replace(' ', '_')}_attack_success", plot_before_after,
                      evaluation[name]["attack_success"], metric="attack success rate",
                      caption=f"{name}: attack success rate before and after, per condition")
        report.table(f"{name}: utility cost on held-out benign reference answers",
                     *utility_rows(_utility(evaluation[name]["utility"])))

    rows = []
    for label in ("harmful", "benign"):
        for n in range(min(examples, len(results["responses"]["original"][label]))):
            for name in results["responses"]:
                r = results["responses"][name][label][n]
                rows.append([label, r["id"] if name == "original" else "", _short(r["prompt"]) if name == "original"
                             else "", name, _short(r["response"]), "yes" if r["refused"] else "no"])
    report.table("Example responses (greedy)", ["set", "id", "prompt", "model", "response", "refused"], rows)
    report.table("Time per stage", ["stage", "seconds"], [[k, v] for k, v in results["seconds"].items()])


def _utility(cost: Mapping):
    """An evaluate.UtilityCost from its results.json form."""
    from precise_jax.evaluate import UtilityCost

    if isinstance(cost, UtilityCost):
        return cost
    return UtilityCost(**{k: v if k == "tokens" else as_estimate(v) for k, v in cost.items()})


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------------- claims


def judge_agreement() -> str:
    """The keyword judge's measured agreement with human labels, as every report states it."""
    from precise_jax.evaluate import KEYWORD_JUDGE_AGREEMENT

    return ("agreement with the human majority labels of JBB's 100 classifier-comparison responses "
            f"{KEYWORD_JUDGE_AGREEMENT:.2f}")


def claims_report(report: Report, results: Mapping, *, false_positives: int = 12) -> None:
    """The claims run (`precise_jax.claims.run_claims`) into `report`: verdicts first, then the evidence."""
    config = results["config"]
    organism = results.get("organism")
    lines = [f"- model: `{results['model']}`"]
    if organism:
        c = organism["chosen"]
        lines.append(f"- model organism: {organism['config']['mode']} SFT of `{organism['base_model']}` on English "
                     f"refusals and benign answers; checkpoint at step {organism['chosen_step']} by the rule: "
                     f"{organism['rule']} (validation: harmful refusal {c['harmful_refusal']:.2f}, benign refusal "
                     f"{c['benign_refusal']:.2f}; targets {'met' if organism['met_targets'] else 'NOT met'})")
    lines.append(f"- languages {', '.join(config['languages'])}; MultiJail items split {1 - config['held_out']:.0%} "
                 f"/ {config['held_out']:.0%} (every language of an item on one side); {config['eval_examples']} "
                 f"held-out prompts per language ({results.get('held_out_items_dropped', 0)} held-out items dropped "
                 f"because the model was trained or validated on them); random controls: {config['random_seeds']} "
                 "seeds")
    report.text("Refusal is judged by the multilingual keyword judge on greedy replies "
                f"({config['max_new_tokens']} tokens; {judge_agreement()}); intervals are 95 % bootstrap "
                "intervals over prompts.\n\n"
                + "\n".join(lines))
    report.table("Verdicts", ["claim", "holds", "rule", "evidence"],
                 [[name, "yes" if v["holds"] else "**no**", v["rule"], v["evidence"]]
                  for name, v in results["verdicts"].items()],
                 note="Each rule was fixed before the run; a claim that does not hold is reported as it is.")
    b = results["behaviour"]
    readability = results["readability"]
    report.table("Behaviour per language (held-out prompts)",
                 ["language", "nats per prompt (× English)", "readable", "harmful refusal",
                  "benign refusal (over-refusal)"],
                 [[lang, f"{readability[lang]['nats']:.0f} (× {readability[lang]['ratio']:.2f})",
                   "yes" if readability[lang]["readable"] else "**no**", b["harmful"][lang]["rate"],
                   b["benign"][lang]["rate"]] for lang in config["languages"]],
                 note="Total next-token NLL of the same human-translated MultiJail prompts in each language (they "
                      "carry the same content, so totals compare across scripts where per-token perplexities do "
                      "not); readable when at most 2× English. A language the model cannot read is no evidence "
                      "either way. All languages: "
                      + ", ".join(f"{k} × {v['ratio']:.2f}" for k, v in readability.items()) + ".")
    report.table("Over-refusal (benign prompts)", ["set", "prompts", "refusal rate"],
                 [["AlpacaEval (held out)", len(b["alpaca"]["refused"]), b["alpaca"]["rate"]],
                  ["borderline-benign (benign prompts that look harmful)", len(b["borderline"]["refused"]),
                   b["borderline"]["rate"]]])
    flagged = [(r["responses"][i], name) for name, r in (("alpaca", b["alpaca"]), ("borderline", b["borderline"]))
               for i, refused in enumerate(r["refused"]) if refused]
    if flagged:
        report.table("Benign replies the keyword judge counts as refusals (check for false positives)",
                     ["set", "reply"], [[name, _short(text, 140)] for text, name in flagged[:false_positives]])
    d = results["direction"]
    report.table(f"Refusal direction (layer {d['layer']}, |r| = {d['norm']:.2f}; {d['rule']})",
                 ["edit", "prompts", "refusal before", "after", "random directions (mean ± sd)"],
                 [["ablate r at every layer", "English harmful", d["harmful_unedited"]["rate"],
                   d["harmful_ablated"]["rate"], _spread(d["random_ablated"])],
                  [f"add r at layer {d['layer']}", "English benign", d["benign_unedited"]["rate"],
                   d["benign_added"]["rate"], _spread(d["random_added"])]])
    for kind, check in results["causal"].items():
        random = check["random_summary"]
        report.table(f"Causal check: {kind} the {check['neurons']} English safety neurons "
                     f"({check['examples']} held-out English harmful prompts)",
                     ["edit", "refusal rate [95% CI]", "sequence refusal score", "first-token score"], [
                         ["none", check["unedited"]["refusal_interval"], f"{check['unedited']['refusal_score']:.3f}",
                          f"{check['unedited']['refusal_logit']:.3f}"],
                         ["safety neurons", check["safety_neurons"]["refusal_interval"],
                          f"{check['safety_neurons']['refusal_score']:.3f}",
                          f"{check['safety_neurons']['refusal_logit']:.3f}"],
                         [f"random sets, same size per layer ({len(check['random'])} seeds, mean ± sd)",
                          f"{random['refusal_rate_mean']:.3f} ± {random['refusal_rate_std']:.3f}",
                          f"{random['refusal_score_mean']:.3f} ± {random['refusal_score_std']:.3f}",
                          f"{random['refusal_logit_mean']:.3f} ± {random['refusal_logit_std']:.3f}"]],
                     note=CAUSAL_NOTE)
    o = results["overlap"]
    report.table("Safety neurons shared across languages (Jaccard)", ["pair", "observed", "random sets (mean ± sd)"],
                 [[k, f"{p['observed']:.3f}", f"{p['random_mean']:.3f} ± {p['random_std']:.3f}"]
                  for k, p in o["pairs"].items()],
                 note="Neurons per language: " + ", ".join(f"{k} {v}" for k, v in results["neurons"].items()) + ".")
    care = results["care"]
    report.table(f"CARE: text subspace (k={care['k']}) at {care['site']} of layers {care['layers']}; "
                 f"{care['jailbreak_prompts']} held-out English harmful prompts behind in-the-wild jailbreak "
                 "preambles", ["run", "harmful refusal", "harmful sequence score", "benign refusal",
                               "first harmful reply", "first benign reply"],
                 [[name, r["harmful"]["rate"], f"{r['harmful']['score']:.3f}", r["benign"]["rate"],
                   _short(r["harmful"].get("example", ""), 80), _short(r["benign"].get("example", ""), 80)]
                  for name, r in care["runs"].items()],
                 note="The replies show whether a strength keeps the model fluent: a refusal rate of 0 can be "
                      "gibberish.")
    t = results["transfer"]
    languages = config["languages"]
    rows = [["original", "–", *[t["original"]["harmful"][lang] for lang in languages], t["original"]["benign"], "–"]]
    rows += [[name, f"{100 * m['fraction']:.3f} %", *[m["harmful"][lang] for lang in languages], m["benign"],
              m["kl"]] for name, m in t["models"].items()]
    report.table(f"Transfer: aligned on {', '.join(t['train_languages'])} ({t['pairs']} pairs, {t['steps']} steps); "
                 f"held-out languages {', '.join(t['held_out_languages'])}",
                 ["model", "trainable", *[f"harmful refusal {lang}" for lang in languages], "benign refusal",
                  "next-token KL (nats)"], rows)
    report.table("Time per stage", ["stage", "seconds"], [[k, v] for k, v in results["seconds"].items()])


def _spread(summary: Mapping) -> str:
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _chosen(training: Mapping) -> str:
    """The validation-chosen step with its rates, or "last" without validation."""
    checks = {c["step"]: c for c in training.get("validation") or []}
    if training.get("chosen_step") not in checks:
        return "last (no validation)"
    c = checks[training["chosen_step"]]
    return f"{c['step']} (harmful {c['harmful_refusal']:.2f}, benign {c['benign_refusal']:.2f})"
