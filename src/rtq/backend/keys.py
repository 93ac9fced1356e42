"""Every Redis key rtq uses, spelled in one place.

All keys share the ``<prefix>|<suffix>|`` head, so one ACL pattern (``~<prefix>|*``) confines a
client to its queue, and a prefix written as a hash tag (``{team}``) keeps every key of a queue in
one Redis Cluster slot: on a cluster, :func:`hash_tagged` wraps a prefix that holds no tag
(``rtq`` becomes ``{rtq}``), so every script and multi-key command of a queue runs on one node.
The first three rows are the seed's layout and are fixed.

=============================================  ========  ==========================================
key                                            type      holds
=============================================  ========  ==========================================
``<p>|<s>|task-queue|<name>``                  list      ids of queued tasks (head is served first)
``<p>|<s>|task-result:<id>``                   hash      the task: data, state, progress, result
``<p>|<s>|task-result:<id>|<frame>``           string    a big payload's extra frame; expires
``<p>|<s>|task-listen|<name>``                 string    listener marker, expires after ``timeout``
``<p>|<s>|task-done:<id>``                     list      one token pushed when the task ends
``<p>|<s>|task-events:<id>``                   stream    progress and output events, in order
``<p>|<s>|task-running|<worker>``              list      ids a worker has claimed (in progress)
``<p>|<s>|task-landing|<worker>|<n>``          list      the id a worker's claim thread was just handed,
                                                         for the instant before claim.lua claims it
``<p>|<s>|task-landing|<worker>``              set       the names of that worker's landing lists
``<p>|<s>|worker:<worker>``                    string    worker heartbeat + info (JSON), expires
``<p>|<s>|workers``                            zset      worker ids scored by when their lease ends
``<p>|<s>|task-dead``                          list      JSON entries of tasks that failed for good
``<p>|<s>|task-failed``                        list      JSON entries of the newest failed tasks
``<p>|<s>|inbox:<client>``                     list      ids of a client's finished tasks
``<p>|<s>|session:<sid>``                      hash      a session or actor: where it lives, its state
``<p>|<s>|session-queue|<worker>``             list      ids of sessions to open in one worker process
``<p>|<s>|session-queue|<worker>|<sid>``       list      ids of calls queued to one session in one
                                                         worker process (served in order, one at a time)
``<p>|<s>|blob:<digest>:<i>``                  string    part ``i`` of a buffer stored once by its
                                                         digest (``x3-…``/``b3-…``); expires
=============================================  ========  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validate import check_no_glob

SEPARATOR = "|"


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it can be part of a key, else raise ``ValueError`` naming the problem.

    Names and ids end up inside key names: an empty one, or one holding the ``|`` separator,
    would alias another queue's keys.
    """
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a str, not {type(value).__name__}: {value!r}")
    if not value:
        raise ValueError(f"{kind} must not be empty")
    if SEPARATOR in value:
        raise ValueError(f"{kind} {value!r} must not contain the key separator {SEPARATOR!r}")
    return value


def hash_tagged(prefix: str) -> str:
    """``prefix`` as a Redis Cluster hash tag (``{prefix}``), unless it already holds one.

    A key's slot is the hash of the text between its first ``{`` and the next ``}`` (when not
    empty): with the prefix in braces, all of a queue's keys share one slot.
    """
    start = prefix.find("{")
    if start >= 0 and prefix.find("}", start + 2) > start:
        return prefix
    return "{" + prefix + "}"


@dataclass(frozen=True)
class Keys:
    """Builds the key names of one queue namespace (``prefix`` and ``suffix``)."""

    prefix: str
    suffix: str

    def __post_init__(self) -> None:
        # ``rtq status`` and the collector SCAN for ``<prefix>|<suffix>|…`` patterns.
        check_no_glob("prefix", check_name("prefix", self.prefix))
        check_no_glob("suffix", check_name("suffix", self.suffix))

    @property
    def head(self) -> str:
        return f"{self.prefix}{SEPARATOR}{self.suffix}{SEPARATOR}"

    def queue(self, name: str) -> str:
        return f"{self.head}task-queue{SEPARATOR}{name}"

    def queue_pattern(self) -> str:
        return f"{self.head}task-queue{SEPARATOR}*"

    def queue_name(self, key: str) -> str:
        """The queue name inside a key made by :meth:`queue`."""
        return key[len(self.queue("")) :]

    def task(self, task_id: str) -> str:
        return f"{self.head}task-result:{task_id}"

    def frame(self, task_id: str, frame: str) -> str:
        """Where one extra frame of a big payload of the task is stored (see :mod:`rtq.backend.store`)."""
        return self.frame_of(self.task(task_id), frame)

    @staticmethod
    def frame_of(task_key: str, frame: str) -> str:
        """:meth:`frame`, from the task's key (the separator cannot occur in a task id)."""
        return f"{task_key}{SEPARATOR}{frame}"

    def listen(self, name: str) -> str:
        return f"{self.head}task-listen{SEPARATOR}{name}"

    def done(self, task_id: str) -> str:
        return f"{self.head}task-done:{task_id}"

    def events(self, task_id: str) -> str:
        return f"{self.head}task-events:{task_id}"

    def running(self, worker_id: str) -> str:
        return f"{self.head}task-running{SEPARATOR}{worker_id}"

    def landing(self, worker_id: str, n: int) -> str:
        """Where claim thread ``n`` of a worker is handed an id (its wake-up and claim share a write)."""
        return f"{self.landings(worker_id)}{SEPARATOR}{n}"

    def landings(self, worker_id: str) -> str:
        """The set of a worker's landing lists (what recovery empties when the worker dies)."""
        return f"{self.head}task-landing{SEPARATOR}{worker_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.head}worker:{worker_id}"

    def workers(self) -> str:
        return f"{self.head}workers"

    def dead(self) -> str:
        return f"{self.head}task-dead"

    def failures(self) -> str:
        """The newest failures (what ``rtq dashboard`` lists), newest first."""
        return f"{self.head}task-failed"

    def inbox(self, client_id: str) -> str:
        return f"{self.head}inbox:{client_id}"

    def session(self, session_id: str) -> str:
        """A session's (or actor's) record: its worker, host, state, the names it holds."""
        return f"{self.head}session:{session_id}"

    def session_opens(self, worker_id: str) -> str:
        """The sessions (and actors) to open in worker process ``worker_id``: its own queue."""
        return f"{self.head}session-queue{SEPARATOR}{worker_id}"

    def session_queue(self, worker_id: str, session_id: str) -> str:
        """The calls queued to session ``session_id``, which lives in worker process ``worker_id`` alone."""
        return f"{self.head}session-queue{SEPARATOR}{worker_id}{SEPARATOR}{session_id}"

    def blob(self, name: str, part: int) -> str:
        """Part ``part`` of the buffer whose digest is named ``name`` (see :mod:`rtq.backend.blobs`)."""
        return f"{self.head}blob:{name}:{part}"

    def blob_pattern(self) -> str:
        return f"{self.head}blob:*"
