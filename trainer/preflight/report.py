"""What one preflight pass knows and finds: the config, where it runs, and the report of errors and warnings it
fills (every check module takes a `PreflightRun`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError
from trainer.flavours import FLAVOURS, Flavour
from trainer.model.wan_layout import block_count


log = logging.getLogger(__name__)


@dataclass
class PreflightReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)  # the dataset scan's report lines
    config: WanforgeConfig | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_invalid(self) -> None:
        """Log the warnings; raise every error as one UserError (one line per problem)."""
        for line in self.warnings:
            log.warning(line)
        if self.errors:
            raise UserError("\n".join(self.errors))


@dataclass
class PreflightRun:
    """What one preflight pass knows: the config, where it runs, and the report it fills."""

    cfg: WanforgeConfig
    report: PreflightReport
    here: bool
    num_processes: int
    resume: str | None
    flavour: Flavour = field(init=False)
    blocks: int = field(init=False)

    def __post_init__(self) -> None:
        self.flavour = FLAVOURS[self.cfg.model.flavour]
        self.blocks = block_count(self.cfg.model, self.flavour)

    def error(self, line: str) -> None:
        self.report.errors.append(line)

    def warn(self, line: str) -> None:
        self.report.warnings.append(line)

    def run(self, check: Callable[[PreflightRun], None]) -> None:
        """A check that raises a UserError (a reused engine function) adds it and the rest still run; so does a file
        or folder the config names that the system refuses to look at (a name too long, a link loop, no permission)."""
        try:
            check(self)
        except UserError as err:
            self.report.errors.extend(line for line in str(err).splitlines() if line.strip())
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            self.report.errors.append(f"{where}{err.strerror or err}: fix the path the config gives for it")
