"""Grid Engine (SGE, Son of Grid Engine, UGE/AGE): qsub, qstat -xml, qdel, qacct.

Everything that names Grid Engine lives here: the ``#$`` directives and the options behind them,
the parsing of ``qstat``/``qacct``/``qconf`` output, and the wording of its states.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sheepdog_executor.errors import ConfigurationError, PollFailed, ResourceConflict, SchedulerError
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch, check_options, render_script
from sheepdog_executor.options import option
from sheepdog_executor.resources import Resources, format_memory, format_time
from sheepdog_executor.scheduler.base import JobStates, Scheduler, SessionJob, TaskState, session_of
from sheepdog_executor.sitelimits import Cap, SiteLimits

#: The resources a site may request memory with, the enforced one first (h_vmem: the execd's limit
#: on the address space; m_mem_free: Univa's, often enforced with cgroups; mem_free: a request).
_MEMORY_REQUESTS = ("h_vmem", "m_mem_free", "mem_free")
_TERSE_JOB_ID = re.compile(r"^(\d+)(?:\.\d+-\d+:\d+)?$")
#: Grid Engine's pseudo variables in -o/-e paths (expanded by the execd, not by a shell).
_JOB_VAR, _TASK_VAR = "$JOB_ID", "$TASK_ID"


@dataclass(frozen=True)
class GridEngineOptions:
    """Grid Engine's own job options, in its words."""

    queue: str | None = option(None, "the queue (-q)", str)
    resources: Mapping[str, str] | Sequence[str] = option(
        None,
        'other -l resources, e.g. {"arch": "lx-amd64"} or ["scratch=10G"] (time=, mem=, gpus= ask for those)',
        "resources",
        factory=dict,
    )
    parallel_environment: str | None = option(
        None, 'the parallel environment of slots= and cpus= (-pe; cpus= alone: "smp")', str
    )
    slots: int = option(1, "slots per task (with parallel_environment=)", int)
    memory_resource: str = option(
        "h_vmem", 'the complex(es) mem= asks for, per slot: "h_vmem", "mem_free" or "h_vmem,mem_free"', str
    )
    gpu_resource: str = option("gpu", "the complex gpus= asks for (-l gpu=N)", str)
    qsub_args: Sequence[str] = option((), "more qsub arguments", "args")

    def __post_init__(self) -> None:
        if not isinstance(self.qsub_args, str):
            object.__setattr__(self, "qsub_args", tuple(self.qsub_args))
        check_options(self)
        if self.slots < 1:
            raise ConfigurationError("slots must be 1 or more")
        if self.parallel_environment is None and self.slots != 1:
            raise ConfigurationError("slots= needs parallel_environment= (e.g. 'smp') to request them")

    def resource_list(self) -> list[str]:
        if isinstance(self.resources, Mapping):
            return [f"{key}={value}" for key, value in self.resources.items()]
        return list(self.resources)

    def memory_complexes(self) -> list[str]:
        return [name.strip() for name in self.memory_resource.split(",") if name.strip()]

    def check_needs(self, needs: Resources) -> None:
        """ResourceConflict when ``resources=``, ``slots=`` or ``qsub_args=`` ask for what
        ``needs`` asks too."""
        asked = {entry.split("=")[0].strip() for entry in self.resource_list()}
        words = {
            "time": {"h_rt"},
            "mem": set(self.memory_complexes()),
            "gpus": {self.gpu_resource},
        }
        for name, value in needs.words().items():
            clash = sorted(asked & words.get(name, set()))
            if clash:
                raise ResourceConflict(name, value, f"resources={{{clash[0]!r}: ...}}", "Grid Engine")
            if name == "cpus" and (self.slots != 1 or "-pe" in self.qsub_args):
                theirs = "slots=" if self.slots != 1 else "qsub_args -pe"
                raise ResourceConflict(name, value, theirs, "Grid Engine")

    def requests(self, needs: Resources) -> tuple[list[str], tuple[str, int] | None]:
        """The ``-l`` requests and the ``-pe`` (name, slots) of a task: the site's own options and
        ``needs`` in Grid Engine's words (memory complexes count per slot: ``mem=`` is divided)."""
        slots = needs.cpus or self.slots
        requests = self.resource_list()
        if needs.time:
            requests.append(f"h_rt={format_time(needs.time)}")
        if needs.mem:
            per_slot = format_memory(-(-needs.mem // slots))
            requests += [f"{name}={per_slot}" for name in self.memory_complexes()]
        if needs.gpus:
            requests.append(f"{self.gpu_resource}={needs.gpus}")
        if needs.cpus and needs.cpus > 1:
            return requests, (self.parallel_environment or "smp", needs.cpus)
        return requests, (self.parallel_environment, self.slots) if self.parallel_environment else None


class GridEngineScheduler(Scheduler[GridEngineOptions]):
    name = "Grid Engine"
    commands = ("qsub", "qstat", "qdel")
    setup_hint = "pass command_setup=['. $SGE_ROOT/default/common/settings.sh']"
    Options = GridEngineOptions
    memory_advice = "raise h_vmem in resources="
    summary_keys = ("failed", "exit_status", "maxvmem", "ru_wallclock", "hostname")
    #: qsub: "job rejected: only 2 jobs are allowed per user (current job count: 3)"
    refusals = ("jobs are allowed per user", "max_u_jobs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Each queue's own ``h_rt`` in seconds, by name, once ``site_limits`` read them: what a
        #: task that asks for no ``h_rt`` may run there (its worker's deadline, ``$QUEUE``'s).
        self.queue_times: dict[str, float] = {}

    def render(self, launch: WorkerLaunch, tasks: int) -> str:
        """The script handed to ``qsub`` on stdin for an array job of ``tasks`` workers."""
        q = shlex.quote
        options, site = self.options, self.site
        lines = [
            "#$ -S /bin/sh",
            f"#$ -N {q(options.job_name)}",
            f"#$ -t 1-{int(tasks)}",
            f"#$ -o {q(launch.output_path(_JOB_VAR, _TASK_VAR, 'out'))}",
            f"#$ -e {q(launch.output_path(_JOB_VAR, _TASK_VAR, 'err'))}",
        ]
        if options.working_directory:
            lines.append(f"#$ -wd {q(options.working_directory)}")
        if site.queue:
            lines.append(f"#$ -q {q(site.queue)}")
        requests, pe = site.requests(options.needs)
        for resource in requests:
            lines.append(f"#$ -l {q(resource)}")
        if pe:
            lines.append(f"#$ -pe {q(pe[0])} {int(pe[1])}")
        if site.qsub_args:
            lines.append("#$ " + " ".join(q(a) for a in site.qsub_args))
        environment = self.task_environment()
        return render_script(lines, "$JOB_ID", "$SGE_TASK_ID", "${NSLOTS:-1}", options, launch, environment)

    @classmethod
    def check_needs(cls, site: GridEngineOptions, needs: Resources) -> None:
        site.check_needs(needs)

    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        return self.submit_script("qsub -terse", self.render(launch, tasks), _TERSE_JOB_ID)

    def poll(self, job_ids: Collection[str]) -> JobStates:
        if not job_ids:
            return {}
        return parse_qstat_xml(self.query('qstat -xml -u "$(id -un)"'), set(job_ids))

    def listing(self) -> JobStates:
        return parse_qstat_xml(self.query('qstat -xml -u "$(id -un)"'), None)

    def cancel(self, job_ids: Collection[str]) -> None:
        if job_ids:
            qdel = "qdel " + " ".join(shlex.quote(j) for j in job_ids) + " >/dev/null 2>&1"
            self.run(qdel, timeout=60, urgent=True)

    def cancel_tasks(self, tasks: Mapping[str, Collection[int]]) -> None:
        """One command: a ``qdel JOB -t FIRST-LAST`` per run of consecutive tasks."""
        removals = [
            f"qdel {shlex.quote(job)} -t {first}-{last} >/dev/null 2>&1"
            for job, ids in tasks.items()
            for first, last in _runs(ids)
        ]
        if removals:
            self.run("; ".join(removals), timeout=60, urgent=True)

    def own_jobs(self) -> list[JobInfo]:
        """The user's own jobs with their names and output paths: ``qstat -u`` for the ids, then
        ``qstat -j`` of those ids only (never ``qstat -j "*"``: every user's jobs, slow on a big
        cluster)."""
        listing = self.run('id -un && qstat -xml -u "$(id -un)"', timeout=60)
        me, _, xml = listing.stdout.partition("\n")
        if listing.returncode != 0 or not me.strip():
            raise SchedulerError(f"qstat failed on {self.shell.description}: {listing.stderr.strip()}")
        ids = sorted(parse_qstat_xml(xml, None), key=int)
        if not ids:
            return []
        details = self.run(f"qstat -j {shlex.quote(','.join(ids))} -xml 2>/dev/null", timeout=60)
        return [job for job in parse_qstat_j_xml(details.stdout) if job.owner == me.strip()]

    def cancel_task(self, job_id: str, task_id: int) -> None:
        self.run(f"qdel {shlex.quote(job_id)} -t {int(task_id)} >/dev/null 2>&1", timeout=60, urgent=True)

    def accounting(self, job_id: str, task_id: int) -> dict[str, str]:
        done = self.run(f"qacct -j {shlex.quote(job_id)} -t {int(task_id)} 2>/dev/null", timeout=60)
        return parse_qacct(done.stdout)

    def time_limit(self) -> float | None:
        asked = self._resource("h_rt")
        return parse_time(asked) if asked else None

    def deadline_expression(self) -> str:
        asked = super().deadline_expression()
        if asked or not self.queue_times:
            return asked
        # no h_rt asked: the h_rt of the queue the task landed in bounds it ($QUEUE names it)
        cases = " ".join(
            f"({shlex.quote(name)}) echo $(( $(date +%s) + {int(seconds)} ));;"
            for name, seconds in sorted(self.queue_times.items())
        )
        return f'$(case "$QUEUE" in {cases} esac)'

    def _like(self, options: JobOptions) -> GridEngineScheduler:
        other = super()._like(options)
        assert isinstance(other, GridEngineScheduler)
        other.queue_times = self.queue_times  # one table, filled by whichever asks the site first
        return other

    def memory_limit(self) -> str:
        vmem = memory_bytes(self._resource("h_vmem") or "")  # per slot, on every process's address space
        return f'"{vmem * self._slots()} vmem"' if vmem else ""

    def limit_hit(self, accounting: Mapping[str, str]) -> str:
        failed = accounting.get("failed", "").split(":")[0].strip()
        if failed == "37":  # "qmaster enforced h_rt, h_cpu, or h_vmem limit": which, its figures say
            limit = self.time_limit() or self.queue_times.get(accounting.get("qname", ""))
            wall = re.match(r"[\d.]+", accounting.get("ru_wallclock", ""))
            if limit and wall and float(wall.group()) >= limit - 1:  # ru_wallclock: whole seconds
                return "time"
            # seen: maxvmem 418MB of an h_vmem of 300M (two processes of 200 MB)
            return "memory" if self._memory_reached(accounting, ("h_vmem",)) else ""
        # a SIGKILL at the memory asked for: a site that enforces it otherwise (cgroups, the OOM
        # killer; Univa's m_mem_free)
        if self.exit_signal(accounting) == 9 and self._memory_reached(accounting, _MEMORY_REQUESTS):
            return "memory"
        return ""

    def killed_for(self, accounting: Mapping[str, str]) -> str:
        hit = self.limit_hit(accounting)
        failed = accounting.get("failed", "").split(":")[0].strip()
        how = "qacct failed 37" if failed == "37" else "killed by SIGKILL"
        if hit == "time" and not self._resource("h_rt"):
            queue = accounting.get("qname", "?")
            return (
                f"Grid Engine killed its task over the time limit of queue {queue} (h_rt="
                f"{format_time(int(self.queue_times.get(queue, 0)))}: ru_wallclock "
                f"{accounting.get('ru_wallclock', '?')}; {how}); a call that long needs a queue "
                "with a longer h_rt (queue=)"
            )
        if hit == "time":
            return (
                f"Grid Engine killed its task over its time limit (h_rt={self._resource('h_rt')}: "
                f"ru_wallclock {accounting.get('ru_wallclock', '?')}; {how}); "
                + ("ask for more time=" if self.options.needs.time else "raise h_rt in resources=")
            )
        if hit == "memory":
            name, asked = self._memory_request(_MEMORY_REQUESTS if failed != "37" else ("h_vmem",))
            slots = f" x {self._slots()} slots" if self._slots() > 1 else ""
            fix = "ask for more mem=" if self.options.needs.mem else f"raise {name} in resources="
            return (
                f"Grid Engine killed its task over its memory ({name}={asked}{slots}: maxvmem "
                f"{accounting.get('maxvmem', '?')}; {how}); {fix}"
            )
        if failed != "37":
            return ""
        requests = self.site.requests(self.options.needs)[0]
        limits = [r for r in requests if r.split("=")[0] in ("h_rt", "h_cpu", "h_vmem")]
        asked = ", ".join(limits) or "the queue's limits"
        return f"Grid Engine killed its task over a limit ({asked}; qacct failed 37); raise it in resources="

    def advice_for_memory(self) -> str:
        return "ask for more mem=" if self.options.needs.mem else self.memory_advice

    def _memory_request(self, names: Sequence[str]) -> tuple[str, str]:
        """The first of these memory resources asked for, and its value ("", "" when none was)."""
        for name in names:
            value = self._resource(name)
            if value:
                return name, value
        return "", ""

    def _memory_reached(self, accounting: Mapping[str, str], names: Sequence[str]) -> bool:
        """Whether the task's peak memory (qacct's maxvmem) reached the memory it asked for."""
        asked = memory_bytes(self._memory_request(names)[1])
        return bool(asked) and memory_bytes(accounting.get("maxvmem", "")) >= 0.9 * asked * self._slots()

    def memory_hint(self, accounting: Mapping[str, str]) -> str:
        requests, pe = self.site.requests(self.options.needs)
        asked = [r.split("=", 1)[1] for r in requests if r.split("=")[0] == "h_vmem"]
        used, limit = memory_bytes(accounting.get("maxvmem", "")), memory_bytes(asked[-1] if asked else "")
        slots = pe[1] if pe else 1
        # a failed allocation is not counted, so the peak can stay well below the limit (258 MB of
        # an h_vmem of 400M seen when an 8 MB allocation failed)
        if not used or not limit or used < 0.5 * limit * slots:
            return ""
        fix = self.advice_for_memory()
        return (
            f"its memory (maxvmem {accounting['maxvmem']}) came close to its limit (h_vmem={asked[-1]}"
            f"{f' x {slots} slots' if slots > 1 else ''}), the likely cause: {fix}"
        )

    def version(self) -> str:
        return self.run("qstat -help 2>&1 | head -n 1", timeout=30).stdout.strip()

    def max_array_size(self) -> int | None:
        done = self.run("qconf -sconf 2>/dev/null", timeout=30)
        return parse_max_aj_tasks(done.stdout)

    def site_limits(self) -> SiteLimits:
        """From the global configuration (``max_aj_tasks``, ``max_aj_instances``, ``max_u_jobs``)
        and the scheduler's (``maxujobs``), in one command."""
        queues = shlex.quote(self.site.queue or "*")
        conf, sconf, queue_conf = self.run_together(
            ["qconf -sconf", "qconf -ssconf", f"qconf -sq {queues}"], 30
        )
        self.queue_times.update(queue_times(queue_conf))
        return dataclasses.replace(parse_site_limits(conf, sconf), **queue_limits(queue_conf))

    def error_reason(self, job_id: str) -> str:
        reasons = self._job_fields(job_id).get("error reason", [])
        return "; ".join(dict.fromkeys(r.split("]: ", 1)[-1] for r in reasons)) or "no reason given"

    def pending_reason(self, job_id: str) -> str:
        values = self._job_fields(job_id).get("scheduling info", [])
        return "; ".join(v for v in values if v and "no messages available" not in v)

    def inspect_command(self, job_id: str) -> str:
        return f"qstat -j {job_id}"

    def session_jobs(self, root: str) -> list[SessionJob]:
        found = []
        for job in self.own_jobs():
            session = session_of(job.stdout_path, root, _JOB_VAR, _TASK_VAR)
            if session is not None:
                found.append(SessionJob(job.id, job.name, session))
        return found

    # -- helpers ----------------------------------------------------------------------------------
    def _resource(self, name: str) -> str | None:
        """The value asked for resource ``name`` (by resources= or the shared time=/mem=), or None."""
        pairs = [r.partition("=") for r in self.site.requests(self.options.needs)[0]]
        values = [value for key, _, value in pairs if key.strip() == name]
        return values[-1].strip() if values else None

    def _slots(self) -> int:
        """The slots of each task (its parallel environment's), which per-slot limits multiply."""
        pe = self.site.requests(self.options.needs)[1]
        return pe[1] if pe else 1

    def _job_fields(self, job_id: str) -> dict[str, list[str]]:
        done = self.run(f"qstat -j {shlex.quote(job_id)} 2>/dev/null", timeout=60)
        return parse_qstat_j(done.stdout)


def _task_ids(text: str) -> list[int]:
    """'3' -> [3]; '2-8:2' -> [2, 4, 6, 8]; '1,4-5:1' -> [1, 4, 5]."""
    ids: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if match:
            first = int(match.group(1))
            last = int(match.group(2) or first)
            ids.extend(range(first, last + 1, int(match.group(3) or 1)))
    return ids


def parse_qstat_xml(text: str, job_ids: set[str] | None) -> JobStates:
    """Task states of the given jobs (of all listed jobs with None) from ``qstat -xml`` output;
    PollFailed for anything else (empty, truncated, not qstat's ``job_info``)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise PollFailed(f"qstat -xml printed something that is not XML ({exc}): {text[:200]!r}") from None
    if root.tag != "job_info":
        raise PollFailed(f"qstat -xml printed <{root.tag}>, not <job_info>: {text[:200]!r}")
    states: JobStates = {}
    for entry in root.iter("job_list"):
        job = (entry.findtext("JB_job_number") or "").strip()
        if not job or (job_ids is not None and job not in job_ids):
            continue
        code = entry.findtext("state") or ""
        if "E" in code:
            state = TaskState.ERROR
        elif entry.get("state") == "running" or "r" in code or "t" in code:
            state = TaskState.RUNNING
        else:
            state = TaskState.QUEUED
        tasks = _task_ids(entry.findtext("tasks") or "1")
        for task in tasks:
            states.setdefault(job, {})[task] = state
    return states


def parse_qstat_j(text: str) -> dict[str, list[str]]:
    """The ``key: value`` lines of plain ``qstat -j JOB`` output, values per key (lowercased) in
    order; ``error reason    1:`` and ``scheduling info:`` lines included."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon or line.startswith((" ", "\t")):
            continue
        key = re.sub(r"\s+\d+$", "", key.strip()).lower()  # "error reason    1" -> "error reason"
        fields.setdefault(key, []).append(value.strip())
    return fields


def parse_qacct(text: str) -> dict[str, str]:
    """The key/value lines of ``qacct -j`` output (the last record when several)."""
    record: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("====="):
            record = {}
            continue
        key, _, value = line.partition(" ")
        if key:
            record[key] = value.strip()
    return record


@dataclass(frozen=True)
class JobInfo:
    """What ``qstat -j`` says about a job that matters here."""

    id: str
    name: str
    owner: str
    #: The first ``-o`` path, as given (``$JOB_ID`` and ``$TASK_ID`` unexpanded).
    stdout_path: str


def parse_qstat_j_xml(text: str) -> list[JobInfo]:
    """The jobs in ``qstat -j IDS -xml`` output (none for ``unknown_jobs`` or unreadable output)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return []
    return [
        JobInfo(
            (element.findtext("JB_job_number") or "").strip(),
            (element.findtext("JB_job_name") or "").strip(),
            (element.findtext("JB_owner") or "").strip(),
            (element.findtext("JB_stdout_path_list/path_list/PN_path") or "").strip(),
        )
        for element in root.findall("./djob_info/element")
    ]


def memory_bytes(size: str) -> int:
    """Bytes in a Grid Engine memory value: ``2G``, ``512M``, qacct's ``257.719MB`` (K, M, G, T:
    powers of 1024; k, m, g, t: of 1000); 0 when it is not one."""
    match = re.fullmatch(r"([\d.]+)([KMGTkmgt]?)B?", size.strip())
    if not match:
        return 0
    unit = match.group(2)
    base = 1000 if unit.islower() else 1024
    return int(float(match.group(1)) * base ** (" kmgt".index(unit.lower()) if unit else 0))


def parse_time(value: str) -> float | None:
    """Seconds in a Grid Engine time: ``90``, ``1:30``, ``1:00:00`` ([[h:]m:]s); None for
    ``INFINITY`` or what is not a time."""
    parts = value.strip().split(":")
    if len(parts) > 3 or not all(re.fullmatch(r"\d+", p) for p in parts):
        return None
    seconds = 0
    for part in parts:
        seconds = 60 * seconds + int(part)
    return float(seconds)


def _runs(ids: Collection[int]) -> list[tuple[int, int]]:
    """Consecutive runs of task ids: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for task in sorted(set(ids)):
        if runs and task == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], task)
        else:
            runs.append((task, task))
    return runs


def _conf_value(text: str, key: str) -> int:
    """An integer of ``qconf -sconf``/``-ssconf`` output (0 when absent, as Grid Engine's "none")."""
    match = re.search(rf"^{key}\s+(\d+)\s*$", text, re.M)
    return int(match.group(1)) if match else 0


def parse_site_limits(qconf_sconf: str, qconf_ssconf: str) -> SiteLimits:
    """The user's limits: arrays of at most ``max_aj_tasks`` tasks and no more than
    ``max_aj_instances`` (more would not run at once), ``max_u_jobs`` jobs in the system (an array
    counts once), ``maxujobs`` jobs running (each task counts); 0 means no limit."""
    arrays = [n for n in (_conf_value(qconf_sconf, k) for k in ("max_aj_tasks", "max_aj_instances")) if n]
    caps = [
        Cap("max_u_jobs", _conf_value(qconf_sconf, "max_u_jobs"), "job"),
        Cap("maxujobs", _conf_value(qconf_ssconf, "maxujobs"), "task"),
    ]
    return SiteLimits(min(arrays) if arrays else None, tuple(c for c in caps if c.value > 0))


def queue_limits(qconf_sq: str) -> dict[str, Any]:
    """The most time (``h_rt``) and memory per slot (``h_vmem``) a task may ask of the queues it may
    go to, from ``qconf -sq``: the largest of them (a task may land in any); none when one has no
    limit (``INFINITY``)."""
    names = re.findall(r"^qname\s+(\S+)", qconf_sq, re.M)
    if not names:
        return {}
    found: dict[str, Any] = {
        "source": f"queue {names[0]}" if len(names) == 1 else "the queues",
        "mem_per_cpu": True,
    }
    for key, field, read in (("h_rt", "max_time", parse_time), ("h_vmem", "max_mem", memory_bytes)):
        values = [read(v) for v in re.findall(rf"^{key}\s+(\S+)", qconf_sq, re.M)]
        if values and len(values) == len(names) and all(values):
            found[field] = int(max(v for v in values if v))
    return found


def queue_times(qconf_sq: str) -> dict[str, float]:
    """Each queue's ``h_rt`` in seconds, by name, from ``qconf -sq`` of one or more queues; a queue
    without a limit (``INFINITY``) or with one per host (``1:00:00,[@short=0:10:00]``) is left out."""
    times: dict[str, float] = {}
    for block in re.split(r"^(?=qname\s)", qconf_sq, flags=re.M):
        name = re.search(r"^qname\s+(\S+)", block, re.M)
        limit = re.search(r"^h_rt\s+(\S+)", block, re.M)
        seconds = parse_time(limit.group(1)) if limit else None
        if name and seconds:
            times[name.group(1)] = seconds
    return times


def parse_max_aj_tasks(qconf_sconf: str) -> int | None:
    """``max_aj_tasks`` from ``qconf -sconf`` (0 means no limit)."""
    match = re.search(r"^max_aj_tasks\s+(\d+)\s*$", qconf_sconf, re.M)
    if not match or int(match.group(1)) == 0:
        return None
    return int(match.group(1))
