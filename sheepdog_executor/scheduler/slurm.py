"""Slurm: sbatch --array, squeue, scancel, sacct, scontrol.

Everything that names Slurm lives here: its options (on sbatch's command line, quoted by the shell),
the parsing of ``squeue``/``sacct``/``scontrol`` output, and which pending reasons mean a job can
never start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from sheepdog_executor.errors import ConfigurationError, PollFailed, ResourceConflict
from sheepdog_executor.jobscript import WorkerLaunch, check_options, render_script
from sheepdog_executor.options import option
from sheepdog_executor.resources import Resources, format_memory, format_time, parse_time
from sheepdog_executor.scheduler.base import JobStates, Scheduler, SessionJob, TaskState, session_of
from sheepdog_executor.sitelimits import Cap, SiteLimits, strictest

#: sbatch's placeholders in --output/--error: the array's job id and the task's index.
_JOB_VAR, _TASK_VAR = "%A", "%a"
_PARSABLE_JOB_ID = re.compile(r"^(\d+)(?:;\S+)?$")
#: ``squeue`` fields, one line per task: array job id, task index, state, reason, name, stdout.
_SQUEUE_FORMAT = "ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,Name:|,STDOUT:"
_SACCT_FIELDS = ("JobID", "State", "ExitCode", "MaxRSS", "Elapsed", "NodeList", "ReqMem", "Timelimit")
#: Pending reasons after which a job never starts by itself: its calls fail with the reason.
NEVER_STARTS = {
    "ReqNodeNotAvail": "a node the job needs is down, drained or reserved",
    "PartitionTimeLimit": "time= is longer than the partition allows",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows",
    "PartitionConfig": "the partition cannot run a job of this shape (cpus_per_task=, mem=, gres=)",
    "BadConstraints": "no node has the features, memory or CPUs asked (constraint=, mem=, cpus_per_task=)",
    "InvalidAccount": "the account= is not valid for you",
    "InvalidQOS": "the qos= is not valid for you",
    "AccountNotAllowed": "the partition does not accept this account=",
    "QOSNotAllowed": "the partition does not accept this qos=",
    "JobHeldAdmin": "an administrator holds the job",
    "JobHeldUser": "the job is held (scontrol hold)",
    "DependencyNeverSatisfied": "a dependency of the job can never be satisfied",
    "launch failed requeued held": "the job failed to launch and Slurm holds it",
}
#: The user's limits, in one command: the largest array, the default account, the associations, the
#: QOSes; each sacctmgr bounded at 10 s (slurmdbd may be slow or down: then no caps are known).
#: each sacctmgr bounded at 10 s: a slow or absent slurmdbd delays the first submit by no more
_BOUNDED = 'b() { if command -v timeout >/dev/null 2>&1; then timeout 10 "$@"; else "$@"; fi; }; b '
#: The site's limits, asked at once (``Scheduler.run_together``): MaxArraySize, the user's default
#: account, associations and QOSes, and the partitions.
_LIMITS_COMMANDS = (
    "scontrol show config | grep -i '^MaxArraySize'",
    _BOUNDED + 'sacctmgr -nP show user "$(id -un)" format=DefaultAccount',
    _BOUNDED + 'sacctmgr -nP show assoc where user="$(id -un)" '
    "format=Account,Partition,MaxSubmitJobs,MaxJobs,QOS,DefaultQOS",
    _BOUNDED + "sacctmgr -nP show qos format=Name,MaxSubmitPU,MaxJobsPU",
    "scontrol show partition -o",
)
_ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING", "CONFIGURING"}


@dataclass(frozen=True)
class SlurmOptions:
    """Slurm's own job options, as sbatch names them (``cpus_per_task`` is ``--cpus-per-task``)."""

    partition: str | None = option(None, "the partition (--partition)", str)
    account: str | None = option(None, "the account charged (--account)", str)
    qos: str | None = option(None, "the quality of service (--qos)", str)
    cpus_per_task: int = option(1, "CPUs per task (--cpus-per-task)", int)
    gres: str | None = option(None, "generic resources (--gres)", str)
    constraint: str | None = option(None, "node features (--constraint)", str)
    sbatch_args: Sequence[str] = option((), "more sbatch arguments", "args")

    def __post_init__(self) -> None:
        if not isinstance(self.sbatch_args, str):
            object.__setattr__(self, "sbatch_args", tuple(self.sbatch_args))
        check_options(self)
        if isinstance(self.cpus_per_task, bool) or not isinstance(self.cpus_per_task, int):
            raise ConfigurationError(f"cpus_per_task must be an integer, not {self.cpus_per_task!r}")
        if self.cpus_per_task < 1:
            raise ConfigurationError("cpus_per_task must be 1 or more")
        if isinstance(self.sbatch_args, str):
            raise ConfigurationError('sbatch_args must be a list of arguments, e.g. ["--exclusive"]')

    def arguments(self, needs: Resources | None = None) -> list[str]:
        """The sbatch arguments these options and the resources each task ``needs`` stand for."""
        needs = needs or Resources()
        gres = ",".join(filter(None, [self.gres, f"gpu:{needs.gpus}" if needs.gpus else ""]))
        found = [
            ("--partition", self.partition),
            ("--account", self.account),
            ("--qos", self.qos),
            ("--time", format_time(needs.time) if needs.time else None),
            ("--mem", format_memory(needs.mem) if needs.mem else None),
            ("--gres", gres or None),
            ("--constraint", self.constraint),
        ]
        arguments = [f"{flag}={value}" for flag, value in found if value is not None]
        cpus = needs.cpus or self.cpus_per_task
        if cpus != 1:
            arguments.append(f"--cpus-per-task={int(cpus)}")
        return arguments + list(self.sbatch_args)

    def check_needs(self, needs: Resources) -> None:
        """ConfigurationError when one of Slurm's own options asks for what ``needs`` asks too."""
        words = needs.words()
        own = {"cpus": self.cpus_per_task != 1, "gpus": "gpu" in (self.gres or "")}
        flags = {
            "time": ("--time", "-t"),
            "mem": ("--mem",),
            "cpus": ("--cpus-per-task", "-c"),
            "gpus": ("--gpu",),
        }
        for name in words:
            given = [a for a in self.sbatch_args if a.startswith(flags[name])]
            if own.get(name) or given:
                theirs = given[0] if given else {"cpus": "cpus_per_task=", "gpus": "gres="}[name]
                raise ResourceConflict(name, words[name], theirs, "Slurm")


class SlurmScheduler(Scheduler[SlurmOptions]):
    name = "Slurm"
    commands = ("sbatch", "squeue", "scancel")
    setup_hint = "pass command_setup=['module load slurm'] (whatever your site uses)"
    Options = SlurmOptions
    memory_advice = "ask for more mem="
    summary_keys = ("State", "ExitCode", "MaxRSS", "ReqMem", "Elapsed", "Timelimit", "NodeList")
    #: sbatch: "AssocMaxSubmitJobLimit", "QOSMaxSubmitJobPerUserLimit", "Job violates accounting/QOS
    #: policy (job submit limit, ...)"
    refusals = ("MaxSubmitJob", "job submit limit")

    def render(self, launch: WorkerLaunch) -> str:
        """The script handed to ``sbatch`` on stdin (its options are on sbatch's command line)."""
        return render_script(
            [],
            "$SLURM_ARRAY_JOB_ID",
            "$SLURM_ARRAY_TASK_ID",
            "${SLURM_CPUS_PER_TASK:-1}",
            self.options,
            launch,
            self.task_environment(),
        )

    def time_limit(self) -> float | None:
        return float(self.options.needs.time) if self.options.needs.time else None

    def memory_limit(self) -> str:
        # what the task got (mem= or the site's default), in MB, against its resident memory
        per_node = "${SLURM_MEM_PER_NODE:-$(( ${SLURM_MEM_PER_CPU:-0} * ${SLURM_CPUS_ON_NODE:-1} ))}"
        return f'"$(( {per_node} * 1048576 )) rss"'

    def deadline_expression(self) -> str:
        # Slurm 23.02 and later set SLURM_JOB_END_TIME; before, the time= asked for, counted from
        # now, or (no time= given: the partition's default) squeue's end time, asked once per task
        asked = super().deadline_expression()
        if not asked:
            end = '$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)'
            asked = f'$(_e="{end}"; case $_e in 2*) date -d "$_e" +%s 2>/dev/null;; esac)'
        return f"${{SLURM_JOB_END_TIME:-{asked}}}"

    def sbatch_command(self, launch: WorkerLaunch, tasks: int) -> str:
        """The sbatch command line for an array job of ``tasks`` workers."""
        arguments = [
            "sbatch",
            "--parsable",
            f"--job-name={self.options.job_name}",
            f"--array=1-{int(tasks)}",
            f"--output={launch.output_path(_JOB_VAR, _TASK_VAR, 'out')}",
            f"--error={launch.output_path(_JOB_VAR, _TASK_VAR, 'err')}",
            "--ntasks=1",
        ]
        if self.options.working_directory:
            arguments.append(f"--chdir={self.options.working_directory}")
        arguments += self.site.arguments(self.options.needs)
        return " ".join(shlex.quote(a) for a in arguments)

    @classmethod
    def check_needs(cls, site: SlurmOptions, needs: Resources) -> None:
        site.check_needs(needs)

    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        return self.submit_script(self.sbatch_command(launch, tasks), self.render(launch), _PARSABLE_JOB_ID)

    def poll(self, job_ids: Collection[str]) -> JobStates:
        if not job_ids:
            return {}
        wanted = set(job_ids)
        states: JobStates = {}
        for job, task, state, reason, _, _ in self._own_tasks():
            if job in wanted and task is not None:
                states.setdefault(job, {})[task] = task_state(state, reason)
        return states

    def listing(self) -> JobStates:
        states: JobStates = {}
        for job, task, state, reason, _, _ in self._own_tasks():
            states.setdefault(job, {})[task or 0] = task_state(state, reason)
        return states

    def cancel(self, job_ids: Collection[str]) -> None:
        if job_ids:
            scancel = "scancel " + " ".join(shlex.quote(j) for j in job_ids) + " >/dev/null 2>&1"
            self.run(scancel, timeout=60, urgent=True)

    def cancel_task(self, job_id: str, task_id: int) -> None:
        self.cancel_tasks({job_id: [task_id]})

    def cancel_tasks(self, tasks: Mapping[str, Collection[int]]) -> None:
        """One ``scancel JOB_[1-5,9] ...`` for all of them."""
        ids = [
            f"{job}_[{','.join(map(str, sorted(map(int, task_ids))))}]"
            for job, task_ids in tasks.items()
            if task_ids
        ]
        if ids:
            self.run(
                "scancel " + " ".join(shlex.quote(i) for i in ids) + " >/dev/null 2>&1",
                timeout=60,
                urgent=True,
            )

    def accounting(self, job_id: str, task_id: int) -> dict[str, str]:
        fields = ",".join(_SACCT_FIELDS)
        job = shlex.quote(f"{job_id}_{int(task_id)}")
        done = self.run(f"sacct -n -P -j {job} -o {fields} 2>/dev/null", timeout=60)
        return parse_sacct(done.stdout, f"{job_id}_{int(task_id)}")

    def version(self) -> str:
        return self.run("sbatch --version 2>&1 | head -n 1", timeout=30).stdout.strip()

    def max_array_size(self) -> int | None:
        done = self.run("scontrol show config 2>/dev/null", timeout=30)
        return parse_max_array_size(done.stdout)

    def site_limits(self) -> SiteLimits:
        """``MaxArraySize``, and the ``MaxSubmitJobs``/``MaxJobs`` of the association and the
        ``MaxSubmitPU``/``MaxJobsPU`` of the QOS the jobs go to (account=, qos=, else the user's
        defaults), in one command; without slurmdbd only the array size."""
        config, user, assocs, qoses, partitions = self.run_together(_LIMITS_COMMANDS, 60)
        site = self.site
        return dataclasses.replace(
            parse_partition_limits(partitions, site.partition),
            max_array=parse_max_array_size(config),
            caps=parse_caps(
                user, assocs, qoses, account=site.account, partition=site.partition, qos=site.qos
            ),
        )

    def limit_hit(self, accounting: Mapping[str, str]) -> str:
        state = accounting.get("State", "").split(" ")[0]
        if state == "TIMEOUT":
            return "time"
        # a site that enforces memory without cgroups (OverMemoryKill): SIGKILL, State FAILED
        if state == "OUT_OF_MEMORY" or (self.exit_signal(accounting) == 9 and self.memory_hint(accounting)):
            return "memory"
        return ""

    def killed_for(self, accounting: Mapping[str, str]) -> str:
        state = accounting.get("State", "").split(" ")[0]
        words = self.options.needs.words()
        hit = self.limit_hit(accounting)
        if hit == "time":
            asked = f"time={words['time']}" if "time" in words else "the partition's default time"
            limit = accounting.get("Timelimit", "?")
            return (
                f"Slurm killed its task over its time limit ({asked}, Timelimit {limit}); ask for more time="
            )
        asked = f"mem={words['mem']}" if "mem" in words else "the site's default memory"
        limit = accounting.get("ReqMem", "?")
        if state == "OUT_OF_MEMORY":
            return f"Slurm killed its task over its memory ({asked}, ReqMem {limit}); ask for more mem="
        if hit == "memory":
            used = accounting.get("MaxRSS", "?")
            return (
                f"Slurm killed its task over its memory ({asked}: MaxRSS {used} reached ReqMem {limit}); "
                "ask for more mem="
            )
        return ""

    def exit_signal(self, accounting: Mapping[str, str]) -> int | None:
        status, _, signal = accounting.get("ExitCode", "").partition(":")
        if signal.isdigit() and int(signal):
            return int(signal)  # the batch shell itself was killed ("0:9")
        return int(status) - 128 if status.isdigit() and 128 < int(status) < 160 else None

    def memory_hint(self, accounting: Mapping[str, str]) -> str:
        used, asked = accounting.get("MaxRSS", ""), accounting.get("ReqMem", "")
        limit = _bytes(asked.rstrip("nc"))  # older Slurm: "4Gn" per node, "4Gc" per CPU
        if not _bytes(used) or not limit or _bytes(used) < 0.9 * limit:
            return ""
        return (
            f"its memory (MaxRSS {used}) reached its request (ReqMem {asked}), the likely cause: "
            "ask for more mem="
        )

    def error_reason(self, job_id: str) -> str:
        reasons = [r for j, _, _, r, _, _ in self._own_tasks() if j == job_id and r not in ("", "None")]
        reason = reasons[0] if reasons else ""
        return describe_reason(reason) if reason else "no reason given"

    def pending_reason(self, job_id: str) -> str:
        reasons = [r for j, _, s, r, _, _ in self._own_tasks() if j == job_id and s == "PENDING"]
        return describe_reason(reasons[0]) if reasons and reasons[0] != "None" else ""

    def inspect_command(self, job_id: str) -> str:
        return f"scontrol show job {job_id}"

    def session_jobs(self, root: str) -> list[SessionJob]:
        found: dict[str, SessionJob] = {}
        for job, task, _, _, name, stdout in self._own_tasks():
            session = session_of(stdout, root, _JOB_VAR, _TASK_VAR) or session_of(
                stdout, root, job, "N/A" if task is None else str(task)
            )
            if session is not None and job not in found:
                found[job] = SessionJob(job, name, session)
        return list(found.values())

    # -- helpers ----------------------------------------------------------------------------------
    def _own_tasks(self) -> list[tuple[str, int | None, str, str, str, str]]:
        """Every task of the user's own jobs: (array job id, task index, state, reason, name, stdout)."""
        return parse_squeue(self.query(f'squeue -r -u "$(id -un)" -O {shlex.quote(_SQUEUE_FORMAT)}'))


def parse_squeue(text: str) -> list[tuple[str, int | None, str, str, str, str]]:
    """Lines of ``squeue -O ArrayJobID:|,ArrayTaskID:|,State:|,Reason:|,Name:|,STDOUT:``, after
    its header (asked for: an empty answer then says nothing, not "no jobs"); PollFailed for an
    answer without the header or with a line that is not such a line."""
    lines = text.splitlines()
    header = [p.strip().upper() for p in lines[0].split("|")] if lines else []
    if header[:3] != ["ARRAY_JOB_ID", "ARRAY_TASK_ID", "STATE"]:
        raise PollFailed(f"squeue printed no header line (ARRAY_JOB_ID|...): {text[:200]!r}")
    rows = []
    for line in lines[1:]:
        parts = [p.strip() for p in line.split("|")]
        if not line.strip():
            continue
        if len(parts) < 6 or not parts[0].isdigit() or not (parts[1].isdigit() or parts[1] == "N/A"):
            raise PollFailed(f"squeue printed a line that is not a task's: {line[:200]!r}")
        job, task, state, reason, name = parts[:5]
        stdout = "|".join(parts[5:])
        rows.append((job, int(task) if task.isdigit() else None, state, reason, name, stdout))
    return rows


def task_state(state: str, reason: str) -> TaskState:
    """Our view of a Slurm state (``PENDING``, ``RUNNING``, ...) and its pending reason."""
    if state == "PENDING" or state.startswith("REQUEUE"):
        return TaskState.ERROR if never_starts(reason) else TaskState.QUEUED
    return TaskState.RUNNING


def never_starts(reason: str) -> bool:
    """Whether a job pending for this reason waits for something that will not come by itself."""
    head = reason.split(",")[0].strip()
    return head in NEVER_STARTS or bool(re.fullmatch(r"(Assoc|QOS)\w*PerJob\w*Limit", head))


def describe_reason(reason: str) -> str:
    """A pending reason with what it means, e.g. ``PartitionTimeLimit (time= is longer ...)``."""
    meaning = NEVER_STARTS.get(reason.split(",")[0].strip())
    return f"{reason} ({meaning})" if meaning else reason


def parse_sacct(text: str, task: str) -> dict[str, str]:
    """The record of one array task (``JOB_TASK``) from ``sacct -n -P -o JobID,State,...``: the
    task's own line, with the largest MaxRSS of its steps. Empty while the task has not ended."""
    record: dict[str, str] = {}
    rss = 0
    for line in text.splitlines():
        values = dict(zip(_SACCT_FIELDS, line.split("|"), strict=False))
        job_id = values.get("JobID", "")
        if job_id == task:
            record = {k: v for k, v in values.items() if k != "JobID" and v}
        elif job_id.startswith(task + "."):
            rss = max(rss, _bytes(values.get("MaxRSS", "")))
    if not record or record.get("State", "").split()[0] in _ACTIVE_STATES:
        return {}
    if rss:
        record["MaxRSS"] = f"{rss / 2**20:.0f}M"
    return record


def _bytes(size: str) -> int:
    match = re.fullmatch(r"([\d.]+)([KMGT]?)", size.strip())
    if not match:
        return 0
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


def parse_partition_limits(scontrol_partitions: str, partition: str | None) -> SiteLimits:
    """The most time and memory a task may ask of the partition the jobs go to (``partition``,
    else the default one), from ``scontrol show partition -o``: ``MaxTime``, ``MaxMemPerNode`` or
    ``MaxMemPerCPU`` (MB); ``UNLIMITED`` is no limit."""
    rows = [
        dict(re.findall(r"(\w+)=(\S*)", line)) for line in scontrol_partitions.splitlines() if line.strip()
    ]
    row = next(
        (
            r
            for r in rows
            if r.get("PartitionName") == partition or (not partition and r.get("Default") == "YES")
        ),
        None,
    )
    if row is None:
        return SiteLimits()
    limits = SiteLimits(source=f"partition {row['PartitionName']}")
    time = row.get("MaxTime", "UNLIMITED")
    if time not in ("UNLIMITED", "INFINITE", ""):
        with contextlib.suppress(ConfigurationError):
            limits = dataclasses.replace(limits, max_time=parse_time(time))
    for key, per_cpu in (("MaxMemPerNode", False), ("MaxMemPerCPU", True)):
        if row.get(key, "").isdigit():
            return dataclasses.replace(limits, max_mem=int(row[key]) * 2**20, mem_per_cpu=per_cpu)
    return limits


def parse_caps(
    user: str, assocs: str, qoses: str, *, account: str | None, partition: str | None, qos: str | None
) -> tuple[Cap, ...]:
    """The caps on the user's jobs from ``sacctmgr -nP`` output: the user's ``DefaultAccount``; the
    associations (``Account|Partition|MaxSubmitJobs|MaxJobs|QOS|DefaultQOS``) of the account the jobs
    go to, the partition's own if there is one, else the account's; the QOS the jobs go to
    (``Name|MaxSubmitPU|MaxJobsPU``). Each array task counts as a job."""
    account = account or (user.strip().splitlines() or [""])[0].strip()
    rows = [line.split("|") + [""] * 6 for line in assocs.splitlines() if line.strip()]
    rows = [row for row in rows if row[0] == account] or rows
    fitting = [row for row in rows if row[1] and row[1] == partition] or [row for row in rows if not row[1]]
    caps: list[Cap | None] = []
    for row in fitting:
        caps += [
            _cap(f"MaxSubmitJobs of association {row[0]}", row[2]),
            _cap(f"MaxJobs of association {row[0]}", row[3]),
        ]
    default_qos = next((row[5] for row in fitting if row[5]), "")
    wanted = qos or default_qos or "normal"
    for line in qoses.splitlines():
        name, submit, running = (line.split("|") + ["", ""])[:3]
        if name == wanted:
            caps += [_cap(f"MaxSubmitPU of QOS {name}", submit), _cap(f"MaxJobsPU of QOS {name}", running)]
    return strictest(c for c in caps if c is not None)


def _cap(name: str, value: str) -> Cap | None:
    return Cap(name, int(value), "task") if value.strip().isdigit() and int(value) > 0 else None


def parse_max_array_size(scontrol_config: str) -> int | None:
    """The largest array this site takes: indices run below ``MaxArraySize``, ours start at 1."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", scontrol_config, re.M)
    return int(match.group(1)) - 1 if match and int(match.group(1)) > 1 else None
