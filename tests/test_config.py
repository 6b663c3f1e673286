"""Option defaults from the config file and SHEEPDOG_* variables: precedence, validation, wiring."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from sheepdog_executor import ConfigurationError, GridEngineExecutor, SlurmExecutor
from sheepdog_executor.config import (
    CONFIG_ENV,
    OPTIONS,
    configured_scheduler,
    env_name,
    environment_options,
    resolve_options,
    uses_config,
)
from sheepdog_executor.executor import ClusterExecutor
from sheepdog_executor.testing import internals


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user config file and no SHEEPDOG_* option variable of the caller leaks in."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv("SHEEPDOG_HOST", raising=False)
    for name in OPTIONS:
        monkeypatch.delenv(env_name(name), raising=False)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An (empty) config file that $SHEEPDOG_EXECUTOR_CONFIG points at; tests write into it."""
    path = tmp_path / "config.toml"
    path.write_text("")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    return path


def test_no_file_and_no_environment_gives_nothing() -> None:
    assert resolve_options("fear", {}) == {}
    assert resolve_options("fear", {"queue": "q"}) == {"queue": "q"}


def test_default_file_location_is_read(tmp_path: Path) -> None:
    path = tmp_path / "home" / ".config" / "sheepdog-executor" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('[default]\nqueue = "all.q"\n')
    assert resolve_options(None, {}) == {"queue": "all.q"}


def test_precedence_explicit_env_host_default(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config.write_text(
        "[default]\n"
        'queue = "short.q"\nmax_workers = 4\npython = "python3.9"\nretries = 1\n'
        '[hosts."fear"]\n'
        'queue = "long.q"\npython = "/opt/py311/bin/python3"\n'
    )
    monkeypatch.setenv("SHEEPDOG_PYTHON", "python3.11")
    assert resolve_options("fear", {"max_workers": 2}) == {
        "queue": "long.q",  # host table over [default]
        "python": "python3.11",  # environment over host table
        "max_workers": 2,  # explicit over everything
        "retries": 1,
    }
    assert resolve_options("other", {})["queue"] == "short.q"
    assert resolve_options(None, {})["queue"] == "short.q"


def test_explicit_none_still_wins(config: Path) -> None:
    config.write_text('[default]\nqueue = "short.q"\n')
    assert resolve_options("fear", {"queue": None}) == {"queue": None}


def test_environment_values_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHEEPDOG_MAX_WORKERS", "8")
    monkeypatch.setenv("SHEEPDOG_POLL_INTERVAL", "0.5")
    monkeypatch.setenv("SHEEPDOG_ECHO_OUTPUT", "yes")
    monkeypatch.setenv("SHEEPDOG_QUEUE", "all.q")
    monkeypatch.setenv("SHEEPDOG_CALLBACK_PORT", "")  # empty: unset
    monkeypatch.setenv("SHEEPDOG_TEST_HOST", "elsewhere")  # not an option: ignored
    monkeypatch.setenv("SHEEPDOG_JOB_ID", "local1-1")  # set for workers, not an option
    assert environment_options() == {
        "max_workers": 8,
        "poll_interval": 0.5,
        "echo_output": True,
        "queue": "all.q",
    }


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SHEEPDOG_MAX_WORKERS", "eight", r"\$SHEEPDOG_MAX_WORKERS='eight' must be an integer"),
        ("SHEEPDOG_HEARTBEAT", "soon", r"\$SHEEPDOG_HEARTBEAT='soon' must be a number"),
        ("SHEEPDOG_ECHO_OUTPUT", "maybe", r"\$SHEEPDOG_ECHO_OUTPUT='maybe' must be true or false"),
        ("SHEEPDOG_SETUP", "module load python", r"\$SHEEPDOG_SETUP is set, but setup is a string or"),
    ],
)
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=message):
        resolve_options("fear", {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[default]\nquee = "all.q"\n', r"unknown option 'quee' in \[default\]; did you mean 'queue'\?"),
        (
            '[hosts."fear"]\nmax_worker = 3\n',
            r"'max_worker' in \[hosts.\"fear\"\]; did you mean 'max_workers'",
        ),
        ('[hosts."fear"]\nhost = "x"\n', r"the host is the table's name"),
        ("[default]\nzzz = 1\n", r"unknown option 'zzz' .*known options: account, batch_window, "),
        ('queue = "all.q"\n', r"unknown table or key 'queue' at the top level"),
        ("[defaults]\n", r"unknown table or key 'defaults'"),
        ('[default]\nmax_workers = "8"\n', r"max_workers in \[default\] must be an integer, not '8'"),
        ("[default]\nmax_workers = true\n", r"must be an integer, not True"),
        ('[default]\nqsub_args = "-V"\n', r"qsub_args in \[default\] must be an array of strings"),
        ("[default]\nresources = { h_vmem = true }\n", r"resources in \[default\] must be a table"),
        ("[default]\nsetup = [1]\n", r"setup in \[default\] must be a string or an array of strings"),
        ('[hosts]\nfear = "x"\n', r'\[hosts."fear"\] must be a table of options'),
        ("[default\n", r"is not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_the_key(config: Path, text: str, message: str) -> None:
    config.write_text(text)
    with pytest.raises(ConfigurationError, match=message) as caught:
        resolve_options("fear", {})
    assert str(config) in str(caught.value)


def test_values_are_normalised(config: Path) -> None:
    config.write_text(
        "[default]\n"
        "poll_interval = 1\n"
        'resources = { h_vmem = "2G", h_rt = 3600 }\n'
        'setup = "module load python"\n'
        'command_setup = [". /opt/sge/default/common/settings.sh"]\n'
        '[hosts."fear"]\n'
        'resources = ["h_vmem=4G"]\n'
    )
    options = resolve_options(None, {})
    assert options["poll_interval"] == 1.0 and isinstance(options["poll_interval"], float)
    assert options["resources"] == {"h_vmem": "2G", "h_rt": "3600"}
    assert options["setup"] == "module load python"
    assert resolve_options("fear", {})["resources"] == ["h_vmem=4G"]


def test_config_path_from_environment_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigurationError, match=r"nope.toml \(from \$SHEEPDOG_EXECUTOR_CONFIG\) does not"):
        resolve_options("fear", {})


def test_every_executor_option_is_configurable() -> None:
    """OPTIONS follows the executors' signatures: a new option must be added there too, tagged with
    the scheduler whose executor alone takes it."""
    not_options = {"self", "scheduler_options", "initializer", "initargs", "host", "options"}
    shared = set(inspect.signature(ClusterExecutor.__init__).parameters) - not_options
    for executor in (GridEngineExecutor, SlurmExecutor):
        own = set(inspect.signature(executor.__init__).parameters) - not_options - shared
        tagged = {
            name for name, option in OPTIONS.items() if option.scheduler == executor.scheduler_class.name
        }
        assert own == tagged, executor
    assert {name for name, option in OPTIONS.items() if not option.scheduler} == shared


def test_each_executor_takes_its_own_options_from_a_shared_default_table(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text('[default]\nqueue = "all.q"\npartition = "debug"\nretries = 2\n')
    seen: dict[str, dict[str, Any]] = {}

    def record(self: ClusterExecutor, *args: Any, **options: Any) -> None:
        seen[type(self).__name__] = options

    monkeypatch.setattr(ClusterExecutor, "__init__", record)
    GridEngineExecutor(host="h")
    SlurmExecutor(host="h")
    assert seen["GridEngineExecutor"]["retries"] == seen["SlurmExecutor"]["retries"] == 2
    assert seen["GridEngineExecutor"]["scheduler_options"].queue == "all.q"
    assert seen["SlurmExecutor"]["scheduler_options"].partition == "debug"


class _Recorder:
    """Stands in for an executor: records what its __init__ received."""

    @uses_config
    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Any = None,
        *,
        host: str | None = None,
        queue: str | None = None,
        python: str = "python3",
        **options: Any,
    ) -> None:
        self.received = {"max_workers": max_workers, "initializer": initializer, "host": host}
        self.received.update(queue=queue, python=python, **options)


def test_uses_config_fills_in_what_was_not_passed(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config.write_text('[default]\nretries = 2\nqueue = "short.q"\n[hosts."fear"]\nqueue = "long.q"\n')
    monkeypatch.setenv("SHEEPDOG_PYTHON", "python3.11")
    assert _Recorder(3, host="fear").received == {
        "max_workers": 3,
        "initializer": None,
        "host": "fear",
        "queue": "long.q",
        "python": "python3.11",
        "retries": 2,
    }
    assert _Recorder(host="fear", queue=None, python="py", retries=0).received == {
        "max_workers": None,
        "initializer": None,
        "host": "fear",
        "queue": None,
        "python": "py",
        "retries": 0,
    }
    assert inspect.signature(_Recorder.__init__).parameters["queue"].default is None


@pytest.mark.cluster
def test_wired_executor_takes_its_options_from_the_config(
    cell: str, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring proposed for GridEngineExecutor.__init__, on a subclass, against the cell."""

    class Configured(GridEngineExecutor):
        __init__ = uses_config(GridEngineExecutor.__init__)  # type: ignore[assignment]

    monkeypatch.setenv("HOME", "/root")  # the real ~/.ssh/config and known_hosts
    config.write_text(f'[default]\nmax_workers = 5\n[hosts."{cell}"]\nqueue = "all.q"\nretries = 1\n')
    monkeypatch.setenv("SHEEPDOG_JOB_NAME", "sheepdog-configured")
    executor = Configured(2, host=cell)
    try:
        scheduler = internals(executor).scheduler
        assert (scheduler.site.queue, scheduler.options.job_name) == ("all.q", "sheepdog-configured")
        assert executor._max_workers == 2
        assert internals(executor).retries == 1
        assert executor.submit(abs, -3).result(timeout=90) == 3
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# -- the usual cluster ---------------------------------------------------------------------------
def test_host_from_the_environment_then_the_default_table(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text('[default]\nhost = "fear"\nretries = 1\n[hosts."fear"]\nqueue = "long.q"\n')
    assert resolve_options(None, {}) == {"host": "fear", "retries": 1, "queue": "long.q"}
    monkeypatch.setenv("SHEEPDOG_HOST", "other")
    assert resolve_options(None, {}) == {"host": "other", "retries": 1}
    # a host given wins, and is not returned (the caller has it)
    assert resolve_options("fear", {}) == {"retries": 1, "queue": "long.q"}
    assert _Recorder().received["host"] == "other"
    assert _Recorder(host="fear").received["host"] == "fear"


def test_no_host_and_no_scheduler_here_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(
        ConfigurationError, match=r"no host given and no qsub here: pass host=.*\$SHEEPDOG_HOST"
    ):
        GridEngineExecutor()
    with pytest.raises(ConfigurationError, match=r"no host given and no sbatch here"):
        SlurmExecutor()


def test_joblib_without_a_host_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import joblib

    from sheepdog_executor.integrations import joblib_backend  # noqa: F401 - registers the backends

    monkeypatch.setenv("PATH", "/nonexistent")
    with (
        joblib.parallel_config(backend="gridengine"),
        pytest.raises(ConfigurationError, match=r"no host given and no qsub here"),
    ):
        joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(3))


def test_a_misspelt_variable_gets_a_warning_naming_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHEEPDOG_MAX_WORKER", "3")
    monkeypatch.setenv("SHEEPDOG_TEST_SLURM_HOST", "x")  # no option's look-alike: no warning
    with pytest.warns(
        UserWarning, match=r"\$SHEEPDOG_MAX_WORKER is not .* did you mean \$SHEEPDOG_MAX_WORKERS\?"
    ):
        assert environment_options() == {}


def test_a_host_table_names_its_scheduler(config: Path) -> None:
    config.write_text(
        '[hosts."a"]\nscheduler = "slurm"\nretries = 1\n'
        '[hosts."b"]\npartition = "short"\n[hosts."c"]\nretries = 1\n'
    )
    assert configured_scheduler("a") == ("slurm", f"scheduler = 'slurm' in [hosts.\"a\"] in {config}")
    assert configured_scheduler("b") == ("slurm", f'Slurm\'s options in [hosts."b"] in {config}')
    assert configured_scheduler("c") is None
    assert resolve_options("a", {}) == {"retries": 1}
    config.write_text('[hosts."a"]\nscheduler = "pbs"\n')
    with pytest.raises(
        ConfigurationError, match=r"scheduler in \[hosts.\"a\"\] must be one of 'gridengine', 'slurm'"
    ):
        resolve_options("a", {})


@pytest.mark.cluster
def test_the_usual_cluster_from_sheepdog_host(cell: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from support import NODE_PYTHON

    monkeypatch.setenv("HOME", "/root")  # the real ~/.ssh/config and known_hosts
    monkeypatch.setenv("SHEEPDOG_HOST", cell)
    with GridEngineExecutor(max_workers=1, python=NODE_PYTHON, poll_interval=0.5) as executor:
        assert executor.submit(abs, -3).result(timeout=90) == 3
        host = executor.status()["host"]
        assert host.startswith(cell) or cell in host
