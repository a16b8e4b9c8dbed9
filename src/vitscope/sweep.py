"""`vitscope sweep`: an Optuna search over config fields, each trial judged by its accuracy on a validation split
carved from the training images, so the test set is never read.

    OUT/study.db        the Optuna study (unless --storage names another); the same command continues it
    OUT/trials/NNNN/    each trial's run directory (its metrics' test_* columns are the validation split's)
    OUT/trials.csv      one row per trial: number, state, validation accuracy, seconds, the values it tried
    OUT/best.toml       the best trial's values and the preset: a `vitscope train --config` file
    OUT/search.png      validation accuracy per trial, and how much each field mattered

The sweep is repeatable: the sampler of the k-th finished trial is seeded with (seed, k), and a trial a killed
sweep left running is failed and its values run again first, so a killed and rerun sweep finishes the very
trials an uninterrupted one would (CPU, same seed).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import socket
import textwrap
import time
import tomllib
import warnings
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from .config import TrainConfig, ViTConfig, resolve_config
from .data import ValidationSplit, load_dataset
from .errors import VitscopeError
from .figures import subplots
from .train import train

try:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState
except ImportError:  # an optional extra: `sweep` says how to install it
    optuna = None

# The fields a search may change: the architecture and the recipe, less those the data decides.
SEARCHABLE = {f.name: str(f.type) for cls in (ViTConfig, TrainConfig) for f in dataclasses.fields(cls)
              if f.name not in ("image_size", "in_channels", "num_classes", "dataset", "data_dir", "max_train_samples")}

# The default space of each preset, in the --space file's form: the recipe's levers around the preset's values.
FAST_SPACE = {
    "lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "muon_lr": {"low": 2e-3, "high": 3e-2, "log": True},
    "weight_decay": {"low": 0.0, "high": 0.2},
    "label_smoothing": {"low": 0.0, "high": 0.2},
    "warmup_epochs": {"low": 0.0, "high": 0.5},
    "augment_shift": {"low": 0, "high": 2},
    "augment_rotate": {"low": 0.0, "high": 20.0},
    "augment_scale": {"low": 0.0, "high": 0.25},
}
DEFAULT_SPACES = {
    "seed": {
        "lr": {"low": 3e-4, "high": 1e-2, "log": True},
        "weight_decay": {"low": 0.0, "high": 0.2},
        "label_smoothing": {"low": 0.0, "high": 0.2},
        "warmup_epochs": {"low": 0.0, "high": 2.0},
        "augment_shift": {"low": 0, "high": 3},
        "augment_rotate": {"low": 0.0, "high": 15.0},
        "augment_scale": {"low": 0.0, "high": 0.2},
    },
    "fast": FAST_SPACE,
    "scope": {**FAST_SPACE, "lr": {"low": 3e-3, "high": 3e-2, "log": True}},  # the fast recipe at lr 1e-2
    # The blog's recipe has no regularisation or schedule to tune: only its step size and batch.
    "blog": {
        "lr": {"low": 1e-4, "high": 3e-3, "log": True},
        "batch_size": {"choices": [32, 64, 128]},
    },
}
RANGE_KEYS = {"low", "high", "log", "step"}
# A trial's heartbeat: one that has not beaten for GRACE_SECONDS is stale (its process is gone) and is run again.
# Trials of a process on this machine that has exited are run again at once (`retry_left_running`).
HEARTBEAT_SECONDS, GRACE_SECONDS = 10, 60
MIN_TRIALS_FOR_IMPORTANCE = 5  # complete trials; with fewer, importances are noise


def default_sweep_out(preset: str) -> Path:
    """Without a timestamp: the same command must find the same study again."""
    return Path("sweeps") / preset


def read_space(path: str | Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise VitscopeError(f"cannot read search space {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise VitscopeError(f"search space {path} is not valid TOML: {e}") from None


def parse_space(table: dict, preset: str, base: dict, source: str) -> dict:
    """{field: optuna distribution} from the --space form: `field = {low, high[, log, step]}` (an int field gives
    ints) or `field = {choices = [...]}`. Every bound and choice must make a valid config with the base."""
    if not table:
        raise VitscopeError(f"{source} names no field to search")
    space = {}
    for name, spec in table.items():
        if name not in SEARCHABLE:
            raise VitscopeError(f"{source}: {name!r} is not a field a sweep can search (any model or train field "
                                "but image_size, in_channels, num_classes and the data's)")
        kinds = {kind.strip() for kind in SEARCHABLE[name].split("|")}
        if not isinstance(spec, dict) or not (set(spec) == {"choices"} or {"low", "high"} <= set(spec) <= RANGE_KEYS):
            raise VitscopeError(f"{source}: {name} must be {{low = .., high = .. [, log = true, step = ..]}} "
                                f"or {{choices = [..]}}, not {spec!r}")
        try:
            if "choices" in spec:
                if not isinstance(spec["choices"], list) or not spec["choices"]:
                    raise ValueError("choices must be a non-empty list")
                distribution = CategoricalDistribution(spec["choices"])
                values = list(spec["choices"])
            elif "int" in kinds:
                if not all(isinstance(spec.get(key, 1), int) for key in ("low", "high", "step")):
                    raise ValueError(f"{name} is an integer field: its low, high and step must be integers")
                distribution = IntDistribution(spec["low"], spec["high"], log=spec.get("log", False),
                                               step=spec.get("step", 1))
                values = [spec["low"], spec["high"]]
            elif "float" in kinds:
                distribution = FloatDistribution(spec["low"], spec["high"], log=spec.get("log", False),
                                                 step=spec.get("step"))
                values = [spec["low"], spec["high"]]
            else:
                raise ValueError(f"{name} is a {SEARCHABLE[name]} field: give {{choices = [..]}}")
        except (ValueError, TypeError) as e:
            raise VitscopeError(f"{source}: {name}: {e}") from None
        for value in values:  # a wrong type or an invalid config: one line, now rather than in a trial
            try:
                resolve_config(preset, {**base, name: value})
            except VitscopeError as e:
                raise VitscopeError(f"{source}: {name} = {value!r}: {e}") from None
        space[name] = distribution
    return space


def suggest(trial, name: str, distribution):
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)


def open_study(storage: str, study_name: str, identity: dict):
    """The study, created or loaded; a study some other command made (another preset, base config, space or
    validation split) is refused, since its trials would not compare."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize", load_if_exists=True)
    except (ValueError, ImportError, optuna.exceptions.OptunaError) as e:
        raise VitscopeError(f"cannot open the study {study_name!r} in {storage}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # SQLAlchemy's errors: a bad URL, an unreachable database, a file that is not one
        if type(e).__module__.startswith("sqlalchemy"):
            raise VitscopeError(f"cannot open storage {storage}: {str(e).splitlines()[0]}") from None
        raise
    recorded = study.user_attrs.get("sweep")
    if recorded is None:
        study.set_user_attr("sweep", identity)
    elif recorded != identity:
        changes = differences(recorded, identity)
        raise VitscopeError(f"study {study_name!r} in {storage} was made by another command ({'; '.join(changes[:3])}"
                            f"{'; ...' if len(changes) > 3 else ''}): rerun that one, or pass another --study or --out")
    return study, rdb


def differences(recorded, current, path: str = "") -> list[str]:
    """Where two JSON values differ, as "base.train.epochs 1, not 2"."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [change for key in sorted(recorded.keys() | current.keys())
                for change in differences(recorded.get(key), current.get(key), f"{path}.{key}".lstrip("."))]
    return [] if recorded == current else [f"{path} {json.dumps(recorded)}, not {json.dumps(current)}"]


def _worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _has_exited(worker: dict | None) -> bool:
    """Whether the process that ran a trial is known to be gone: one of this machine's that no longer exists."""
    if not worker or worker.get("host") != socket.gethostname():
        return False  # another machine's: its heartbeat tells
    if worker["pid"] == os.getpid():
        return True  # that process is gone, and this one got its pid
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def retry_left_running(study, rdb) -> list[int]:
    """Trials a killed sweep left RUNNING are failed (those of an exited process here at once, others once their
    heartbeat is stale) and their values queued to run next. Returns the failed trials' numbers."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    study_id = rdb.get_study_id_from_name(study.study_name)
    retried = []
    for trial in running:
        trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if rdb.get_trial(trial_id).state == TrialState.RUNNING and _has_exited(trial.user_attrs.get("worker")):
            try:
                rdb.set_trial_state_values(trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # it finished after all
                continue
        if rdb.get_trial(trial_id).state == TrialState.FAIL:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            retried.append(trial.number)
    return retried


def finished_trials(study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def sampler_for(seed: int, finished: int):
    """TPE seeded by (seed, number of finished trials): the trials' values are a function of the seed and the
    history, whether or not the sweep was killed in between (a fresh TPESampler reads all history from storage)."""
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + finished) % 2**32)


def sweep(preset: str, overrides: dict, out: str | Path, space_file: str | Path | None = None,
          trials: int | None = None, time_budget: float | None = None, storage: str | None = None,
          study_name: str | None = None, validation: ValidationSplit | None = None, pruner=None,
          progress: bool = False, log=print):
    """Run (or continue) a study until it holds `trials` finished (complete or pruned) trials, or until a trial
    ends past `time_budget` seconds, then write trials.csv, search.png and best.toml into `out`. `overrides` fix the
    base config every trial starts from; `validation` is the split that judges them (default: a sixth of the
    training images, seed 0); `pruner` is optuna's (default: MedianPruner, after 5 trials).
    Returns the optuna Study."""
    if optuna is None:
        raise VitscopeError("vitscope sweep needs Optuna: pip install 'vitscope[sweep]'")
    if trials is None and time_budget is None:
        trials = 20
    if trials is not None and trials < 1:
        raise VitscopeError("--trials must be at least 1")
    if time_budget is not None and time_budget <= 0:
        raise VitscopeError("--time-budget must be positive")
    overrides = dict(overrides)
    if overrides.get("data_dir"):
        overrides["data_dir"] = str(Path(overrides["data_dir"]).resolve())  # the study's identity: not the cwd's
    model_config, recipe, _ = resolve_config(preset, overrides)
    if space_file is not None:
        space = parse_space(read_space(space_file), preset, overrides, str(space_file))
    elif preset in DEFAULT_SPACES:
        space = parse_space(DEFAULT_SPACES[preset], preset, overrides, f"the {preset} preset's space")
    else:
        raise VitscopeError(f"the {preset} preset has no default search space: give --space FILE")

    validation = validation or ValidationSplit()
    dataset = load_dataset(recipe.dataset, recipe.data_dir, recipe.max_train_samples, validation)
    log(f"data: {dataset.name} from {dataset.source}: {dataset.validation['size']} of its "
        f"{dataset.validation['carved_from']} training images held out for validation (seed {validation.seed}), "
        f"trials train on {len(dataset.train_labels)} of the rest; the test set is not read")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    identity = {"preset": preset,
                "base": {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(recipe)},
                "space": {name: optuna.distributions.distribution_to_json(d) for name, d in space.items()},
                "validation": dataset.validation}
    with quiet_optuna():
        study, rdb = open_study(storage, study_name or preset, json.loads(json.dumps(identity)))
        if not study.trials and (out / "trials").is_dir() and any((out / "trials").iterdir()):
            raise VitscopeError(f"{out / 'trials'} holds the trials of another study: pass another --out")
        # By default a trial stops after an epoch that ends below the median of earlier trials at that epoch.
        study.pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=5)
        retried = retry_left_running(study, rdb)
        if retried:
            log(f"{'trials' if len(retried) > 1 else 'trial'} {', '.join(map(str, retried))} left running by a "
                "killed sweep: failed, and run again")
        objective = Objective(preset, overrides, space, dataset, out / "trials", progress)

        def after_trial(study, trial) -> None:
            retry = f"  (retry of trial {trial.user_attrs['retry_of']})" if "retry_of" in trial.user_attrs else ""
            value = "-" if trial.value is None else f"{trial.value:.2%}"
            log(f"trial {trial.number:>3} {trial.state.name:<8} validation accuracy {value}  "
                f"{trial_seconds(trial):.1f} s  {format_values(trial.params)}{retry}")  # COMPLETE or PRUNED
            write_trials_csv(study, space, out / "trials.csv")

        start = time.monotonic()
        while trials is None or len(finished_trials(study)) < trials:
            study.sampler = sampler_for(recipe.seed, len(finished_trials(study)))
            try:
                study.optimize(objective, n_trials=1, callbacks=[after_trial], gc_after_trial=False)
            except KeyboardInterrupt:  # optuna failed the trial it stopped: its values run first next time
                stopped = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                for trial in (t for t in stopped if t.number == objective.latest):
                    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                raise
            if time_budget is not None and time.monotonic() - start >= time_budget:
                log(f"time budget of {time_budget:g} s spent: no more trials")
                break
    report_sweep(study, space, out, preset, storage, dataset, overrides, log)
    return study


@contextlib.contextmanager
def quiet_optuna():
    """Optuna's own log lines off (vitscope says what happened, in its lines), and back as they were after."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


class Objective:
    """One trial: the base config with the trial's values, trained on the sweep's data into OUT/trials/NNNN,
    reporting validation accuracy each epoch (the run's held-out split is the validation one) so that the
    pruner can stop it."""

    def __init__(self, preset: str, overrides: dict, space: dict, dataset, folder: Path, progress: bool):
        self.preset, self.overrides, self.space = preset, overrides, space
        self.dataset, self.folder, self.progress = dataset, folder, progress
        self.latest = None  # the number of this process's latest trial

    def __call__(self, trial) -> float:
        self.latest = trial.number
        trial.set_user_attr("worker", _worker())  # first: a kill from here on leaves a trial we can tell is dead
        values = {name: suggest(trial, name, distribution) for name, distribution in self.space.items()}
        try:
            model_config, recipe, runtime = resolve_config(self.preset, {**self.overrides, **values})
        except VitscopeError as e:
            raise VitscopeError(f"trial {trial.number} ({format_values(values)}): {e}") from None
        rows = []

        def report(row: dict) -> None:
            rows.append(row)
            trial.report(row["test_acc"], row["epoch"])
            if row["epoch"] < recipe.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {row['test_acc']:.2%} after epoch {row['epoch']}")

        train(model_config, recipe, self.folder / f"{trial.number:04d}", preset=self.preset, progress=self.progress,
              log=lambda *args: None, runtime=runtime, dataset=self.dataset, on_epoch=report)
        return rows[-1]["test_acc"]


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_values(values: dict) -> str:
    return " ".join(f"{name}={format_value(value)}" for name, value in values.items())


def trial_seconds(trial) -> float | None:
    """How long a finished trial took (None for others: a failed one ends when it is found dead)."""
    if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def write_trials_csv(study, space: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "validation_accuracy", "seconds", *space])
        for trial in study.get_trials(deepcopy=False):
            writer.writerow([trial.number, trial.state.name, "" if trial.value is None else trial.value,
                             "" if (seconds := trial_seconds(trial)) is None else round(seconds, 3),
                             *(trial.params.get(name, "") for name in space)])


def trials_table(study, space: dict) -> str:
    rows = [["trial", "state", "val acc", "seconds", *space]]
    for trial in study.get_trials(deepcopy=False):
        rows.append([str(trial.number), trial.state.name, "-" if trial.value is None else f"{trial.value:.2%}",
                     "-" if (seconds := trial_seconds(trial)) is None else f"{seconds:.1f}",
                     *(format_value(trial.params.get(name, "-")) for name in space)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def importances(study) -> dict[str, float]:
    """How much each field mattered to validation accuracy (optuna's default evaluator), or {} where there are
    too few complete trials to tell."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    with warnings.catch_warnings():  # optuna warns where it cannot tell, and returns equal shares
        warnings.simplefilter("error")
        try:
            return optuna.importance.get_param_importances(study)
        except (Warning, ValueError, RuntimeError):
            return {}


def plot_search(study, importance: dict[str, float], path: Path) -> Path:
    """Validation accuracy per trial (pruned ones at their last reported epoch) with the best so far, beside
    each field's importance."""
    fig, (left, right) = subplots(1, 2, figsize=(11, 4), dpi=110)
    best, best_so_far = None, []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            best = trial.value if best is None else max(best, trial.value)
        best_so_far.append((trial.number, best))
    for state, marker, colour in ((TrialState.COMPLETE, "o", "tab:blue"), (TrialState.PRUNED, "x", "tab:gray")):
        points = [(t.number, t.value) for t in study.get_trials(deepcopy=False, states=(state,)) if t.value is not None]
        if points:
            left.plot(*zip(*points), marker, color=colour, label=state.name.lower(), linestyle="none")
    drawn = [(number, value) for number, value in best_so_far if value is not None]
    if drawn:
        left.step(*zip(*drawn), where="post", color="tab:orange", label="best so far")
    left.set_xlabel("trial")
    left.set_ylabel("validation accuracy")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_title(f"validation accuracy per trial (study {study.study_name})")
    left.grid(alpha=0.3)
    left.legend()
    if importance:
        names = list(importance)[::-1]
        right.barh(names, [importance[name] for name in names], color="tab:blue")
        right.set_xlabel("importance for validation accuracy")
    else:
        right.text(0.5, 0.5, f"fewer than {MIN_TRIALS_FOR_IMPORTANCE} complete trials:\ntoo few to tell each "
                   "field's importance", ha="center", va="center")
        right.set_axis_off()
    right.set_title("field importance")
    fig.tight_layout()
    fig.savefig(path)
    return path


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def write_best(study, out: Path, preset: str, storage: str, dataset, overrides: dict) -> Path:
    """best.toml: the preset and the best trial's values, with where they came from in its comment header."""
    best = study.best_trial
    finished = len(finished_trials(study))
    base = ", ".join(f"{key} = {toml_value(value)}" for key, value in overrides.items()) or "nothing else"
    split = dataset.validation
    lines = [
        f"# vitscope sweep: the best of {finished} finished trials of study {study.study_name!r} in {storage}:",
        f"# trial {best.number}, validation accuracy {best.value:.2%}. These values were chosen by accuracy on",
        f"# {split['size']} images held out of the {split['carved_from']} training images (seed {split['seed']});",
        f"# the trials trained on {len(dataset.train_labels)} of the others, and no trial read the test set.",
        *textwrap.wrap(f"The trials' base: preset {preset} with {base}.", 110, initial_indent="# ",
                       subsequent_indent="# ", break_on_hyphens=False),
        "# Train with them: vitscope train --config best.toml",
        f"preset = {toml_value(preset)}",
        *(f"{name} = {toml_value(value)}" for name, value in best.params.items()),
    ]
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text) == {"preset": preset, **best.params}
    path = out / "best.toml"
    path.write_text(text)
    return path


def report_sweep(study, space: dict, out: Path, preset: str, storage: str, dataset, overrides: dict, log) -> None:
    log(trials_table(study, space))
    write_trials_csv(study, space, out / "trials.csv")
    importance = importances(study)
    if importance:
        log("importance: " + ", ".join(f"{name} {share:.2f}" for name, share in importance.items()))
    plot_search(study, importance, out / "search.png")
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    log(f"study {study.study_name!r}: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    if counts["complete"]:
        best = study.best_trial
        write_best(study, out, preset, storage, dataset, overrides)
        log(f"best: trial {best.number}, validation accuracy {best.value:.2%}: {format_values(best.params)}")
        log(f"train it: vitscope train --config {out / 'best.toml'}")
    else:
        log("no trial completed: no best.toml")
    log(f"sweep directory: {out}")
