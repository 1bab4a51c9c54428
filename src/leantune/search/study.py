"""Shared Optuna studies: ``leantune sweep`` and ``compare`` workers on one study in a database.

``--storage URL`` takes any Optuna RDB URL (``postgresql://``, ``mysql://``, ``sqlite:///``).
Every worker (a process, on this machine or another, each with its own ``--out``) given the same
URL and ``--study`` name takes trials from the one study:

* the setup (common options, data fingerprint, search space or strategies, metric) is stored in
  the study's user attributes by the first worker; a worker with another setup is refused;
* after ``study.ask()`` a worker counts the trials finished and those running or waiting with a
  lower number (the database numbers trials atomically): a trial beyond the target is given
  back (failed, user attribute ``surplus``) and the worker waits for the others;
* a trial whose parameters equal those of a finished, running or earlier waiting trial is given
  back (failed, ``duplicate_of``) and the worker asks again, at most ``MAX_DUPLICATES`` times;
* each running trial records a heartbeat; a trial whose worker stopped beating for the grace
  period (a kill -9, a lost machine) is failed and queued again (Optuna's retry callback);
* workers stay until every trial has ended, retrying lost trials, so the study always ends with
  exactly the target; each then writes the results from the study into its own ``--out``.

Passwords never leave the URL: what is printed or written holds :func:`mask_url`'s form.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from leantune.core.errors import LeantuneError

HEARTBEAT_ENV = "LEANTUNE_HEARTBEAT"
DEFAULT_HEARTBEAT = (60, 180)
"""Seconds between a running trial's heartbeats, and without one before it counts as lost."""
SETUP_ATTR = "leantune_setup"
OPTIONS_ATTR = "leantune_options"
MAX_DUPLICATES = 20
MAX_RETRY = 3


def driver_url(url: str) -> str:
    """``postgresql://`` names psycopg 3 (``postgresql+psycopg://``); an explicit driver stays."""
    if re.match(r"postgres(ql)?://", url):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def mask_url(url: str) -> str:
    """The URL with its password shown as ``***``: the only form printed or written."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy reads: hide whatever sits between ':' and '@'
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds: ``LEANTUNE_HEARTBEAT=interval[,grace]`` or the defaults."""
    value = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not value:
        return DEFAULT_HEARTBEAT
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise LeantuneError(
            f"{HEARTBEAT_ENV}={value!r}: give whole seconds as interval or interval,grace "
            "(e.g. 60,180)"
        )
    return parts[0], parts[1] if len(parts) == 2 else 3 * parts[0]


def worker_id() -> str:
    """This worker as ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _storage(url: str, heartbeat: tuple[int, int]) -> Any:
    """An RDBStorage with heartbeats and retries of lost trials; errors as one line.

    Workers starting together on a new database race to create Optuna's tables: the loser's
    error (a duplicate table or type) is followed by another try."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return _new_storage(url, heartbeat)
        except (IntegrityError, ProgrammingError) as e:
            if attempt == 4:
                raise _cannot_connect(url, e) from None
            time.sleep(0.5 + random.random())
        except (ImportError, ModuleNotFoundError) as e:
            raise LeantuneError(
                f"--storage {mask_url(url)}: its database driver is missing ({e}); for "
                "PostgreSQL pip install 'leantune[scale]'"
            ) from None
        except Exception as e:
            raise _cannot_connect(url, e) from None
    raise AssertionError("unreachable")


def _cannot_connect(url: str, e: BaseException) -> LeantuneError:
    return LeantuneError(
        f"--storage {mask_url(url)}: cannot connect ({_reason(e, url)}); check the URL and that "
        "the server is running"
    )


def _new_storage(url: str, heartbeat: tuple[int, int]) -> Any:
    import optuna

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore")
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        if retry is not None:
            callback = {"heartbeat_stale_trial_callback": retry(max_retry=MAX_RETRY)}
        else:  # optuna < 4.9
            callback = {
                "failed_trial_callback": optuna.storages.RetryFailedTrialCallback(MAX_RETRY)
            }
        return optuna.storages.RDBStorage(
            driver_url(url),
            engine_kwargs=engine,
            heartbeat_interval=heartbeat[0],
            grace_period=heartbeat[1],
            **callback,
        )


def _reason(e: BaseException, url: str) -> str:
    """The first line of a database error, the password taken out."""
    inner = getattr(e, "orig", None) or e
    text = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        password = make_url(driver_url(url)).password
        if password:
            text = text.replace(str(password), "***")
    return text


def open_study(url: str, name: str, higher: bool, heartbeat: tuple[int, int] | None = None) -> Any:
    """The study ``name`` in ``url`` (made if new), with heartbeats on."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(url, heartbeat or heartbeat_settings())
    try:
        return optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize" if higher else "minimize",
            load_if_exists=True,
        )
    except Exception as e:
        raise LeantuneError(
            f"--storage {mask_url(url)}: cannot open study {name!r} ({_reason(e, url)})"
        ) from None


def load_study(url: str, name: str) -> Any:
    """An existing study, for reading its results; refused when it does not exist."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(url, heartbeat_settings())
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise LeantuneError(
            f"--storage {mask_url(url)} holds no study {name!r}; check --study"
        ) from None


def _normal(value: Any) -> Any:
    """As it reads back from the study's JSON attributes."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def join_setup(study: Any, setup: Mapping[str, Any], options: Mapping[str, Any], what: str) -> None:
    """Store the setup in a new study; refuse a study made for another one, naming what differs."""
    from leantune.search.setup import differences

    mine = _normal(dict(setup))
    if SETUP_ATTR not in study.user_attrs:
        study.set_user_attr(SETUP_ATTR, mine)
        study.set_user_attr(OPTIONS_ATTR, _normal(dict(options)))
    theirs = study.user_attrs.get(SETUP_ATTR)  # read again: another worker may have been first
    if theirs != mine:
        diff = sorted(differences(theirs or {}, mine))
        raise LeantuneError(
            f"study {study.study_name!r} was made for another {what} ({', '.join(diff)} differ); "
            "use the same options as its other workers, or another --study"
        )


# ---------------------------------------------------------------------------- trials


def is_done(t: Any) -> bool:
    """Finished for good: complete, pruned, or refused with an error."""
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "error" in t.user_attrs
    )


def is_void(t: Any) -> bool:
    """Given back without running: beyond the target, or parameters already taken."""
    return "surplus" in t.user_attrs or "duplicate_of" in t.user_attrs


def _pending(t: Any) -> bool:
    from optuna.trial import TrialState

    return t.state in (TrialState.RUNNING, TrialState.WAITING)


def give_back(study: Any, trial: Any, **attrs: Any) -> None:
    """Fail a trial that will not run here, with the reason as user attributes."""
    from optuna.trial import TrialState

    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, state=TrialState.FAIL)


def requeue(study: Any, trial: Any) -> None:
    """An interrupted trial: failed, its parameters queued for any worker to run again."""
    from optuna.trial import TrialState

    trial.set_user_attr("interrupted", True)
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def fail_stale(study: Any) -> None:
    """Fail the trials whose worker stopped beating, queueing them again."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


RECHECK_SECONDS = 1.0
"""How long a worker waits before it checks its draw again against earlier running trials."""


def duplicate_of(trials: list[Any], trial: Any, params: Mapping[str, Any]) -> int | None:
    """The number of a finished, running or earlier waiting trial with the same parameters."""
    for t in trials:
        if t.number == trial.number or is_void(t) or dict(t.params) != dict(params):
            continue
        if is_done(t) or (_pending(t) and t.number < trial.number):
            return int(t.number)
    return None


@contextlib.contextmanager
def beating(study: Any, trial: Any) -> Iterator[None]:
    """Record the trial's heartbeat in a thread while the block runs."""
    storage = study._storage
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def next_trial(
    study: Any,
    limit: int,
    params_of: Callable[[Any], dict[str, Any]],
    say: Callable[[str], None],
) -> tuple[Any, dict[str, Any], int] | None:
    """A trial to run here, its parameters and how many trials were done; None when ``limit``
    are done. Waits while the rest are running elsewhere (retrying those lost)."""
    poll = min(study._storage.get_heartbeat_interval(), 10)
    duplicates = 0
    waiting_said = False
    while True:
        fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(is_done(t) for t in trials)
        if done >= limit:
            return None
        pending = [t for t in trials if _pending(t) and not is_void(t)]
        if done + len(pending) >= limit and not any(t.state.name == "WAITING" for t in pending):
            if not waiting_said:
                say(f"{done} of {limit} done, the rest running elsewhere; waiting for them")
                waiting_said = True
            time.sleep(poll)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask()
        trials = study.get_trials(deepcopy=False)
        ahead = sum(is_done(t) or (_pending(t) and t.number < trial.number) for t in trials)
        if ahead >= limit:
            give_back(study, trial, surplus=True)
            continue
        params = params_of(trial)
        twin = duplicate_of(trials, trial, params)
        if twin is None and any(_pending(t) and t.number < trial.number for t in trials):
            # An earlier trial asked by another worker may not have written its parameters
            # yet (workers started together draw alike): look again once it has.
            time.sleep(RECHECK_SECONDS)
            twin = duplicate_of(study.get_trials(deepcopy=False), trial, params)
        if twin is None:
            trial.set_user_attr("worker", worker_id())
            return trial, params, done
        give_back(study, trial, duplicate_of=twin)
        duplicates += 1
        if duplicates >= MAX_DUPLICATES:
            raise LeantuneError(
                f"{duplicates} draws in a row gave parameters already tried: the search space "
                "is exhausted; widen --space or ask for fewer --trials"
            )


def run_study_trials(
    study: Any,
    limit: int,
    params_of: Callable[[Any], dict[str, Any]],
    run_one: Callable[[Any, dict[str, Any], int], bool],
    say: Callable[[str], None],
) -> bool:
    """Run trials here until ``limit`` are done in the study; False when interrupted.

    ``run_one(trial, params, done)`` runs a trial and tells the study how it ended; it returns
    True when the run was interrupted (the trial is then queued again for any worker)."""
    from optuna.exceptions import UpdateFinishedTrialError

    while True:
        try:
            got = next_trial(study, limit, params_of, say)
        except KeyboardInterrupt:
            return False
        if got is None:
            return True
        trial, params, done = got
        try:
            with beating(study, trial):
                interrupted = run_one(trial, params, done)
        except UpdateFinishedTrialError:
            say(f"trial {trial.number} was taken as lost (no heartbeat); another worker runs it")
            continue
        except BaseException:
            with contextlib.suppress(Exception):
                requeue(study, trial)
            raise
        if interrupted:
            requeue(study, trial)
            return False
