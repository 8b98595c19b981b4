"""Which value a flow run uses: its parameter, or the `CM_*` setting of the process running it.

The rule, in one sentence: an explicit argument, CLI option or run parameter beats a `CM_*`
setting; `CM_*` settings fill in what nothing explicit says.

The deployable flows' parameters default to the package defaults, so the UI's run form shows
what a run uses. The `CM_*` settings name the same things for code that uses the package
directly - `get_stac_token()` reads the token from the block `CM_TOKEN_BLOCK` names. Each pair
(`base_url` and `CM_BASE_URL`, `lifetime_days` and `CM_TOKEN_LIFETIME_DAYS`, `email_block` and
`CM_EMAIL_BLOCK`, `password_block` and `CM_PASSWORD_BLOCK`, `token_block` and `CM_TOKEN_BLOCK`)
follows it. A parameter is explicit when:

- a deployment run was given it: by the deployment's parameters (`cm-tasks deploy` writes the
  `CM_*` settings of the shell it runs in there) or by whoever started the run (a caller in
  `deployment` mode, the run form's custom run, `prefect deployment run --param`);
- `cm-tasks refresh` got it as an option (`given_parameters`), or filled it in from the
  `CM_*` settings of its own shell;
- a Python call passed a value other than the default (a call cannot tell
  `token_block="carbon-mapper-stac-token"` from no argument at all).

    parameter               setting         the run uses
    ----------------------  --------------  --------------------------------------------------
    any                     unset/default   the parameter
    X                       X               X
    explicit X              Y               X, with a warning (get_stac_token() there reads Y)
    not given, in a Python  Y               Y, logged
    call
    not given, in a         Y               ParameterConflictError before any call; for
    deployment run                          base_url, Y, logged (the worker's CM_BASE_URL,
                                            as before base_url was a parameter)

The last row is the one guess the rule refuses to make: a run of a deployment that does not
name the parameter (a Quick run, the schedule) shows the package default in the run form,
while the worker's setting names something else. A run that used Y would make the form wrong;
one that used the default would leave `get_stac_token()` on that worker reading Y. Either would
go unnoticed until ingest found an old token. Failing before any call keeps the stored token,
says how to make the two agree, and the daily watchdog still sees the old token.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from prefect.context import FlowRunContext

from cm_tasks._logging import current_logger
from cm_tasks.errors import ConfigurationError
from cm_tasks.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_EMAIL_BLOCK,
    DEFAULT_PASSWORD_BLOCK,
    DEFAULT_TOKEN_BLOCK,
    DEFAULT_TOKEN_LIFETIME_DAYS,
    ENV_PREFIX,
    CarbonMapperSettings,
    api_identity,
)


class ParameterConflictError(ConfigurationError):
    """A deployment run left a parameter at its default while the worker's setting differs."""


@dataclass(frozen=True)
class SettingPair:
    """A flow parameter, the settings field that matches it, and their shared default."""

    parameter: str
    field: str
    default: object
    # The spelling in which two values are compared: two URLs of one API are one value.
    canonical: Callable[[Any], object] = dataclass_field(default=lambda value: value)
    # Whether a deployment run that was not given the parameter stops when the worker's
    # setting differs (ParameterConflictError), or takes the setting, logged.
    guarded: bool = True

    def same(self, a: object, b: object) -> bool:
        """Whether a and b name the same thing (`https://h/api/v1` is `https://h/api/v1/`)."""
        return bool(self.canonical(a) == self.canonical(b))

    @property
    def variable(self) -> str:
        """The environment variable of the setting, e.g. `CM_TOKEN_BLOCK`."""
        return f"{ENV_PREFIX}{self.field.upper()}"


PAIRS: dict[str, SettingPair] = {
    pair.parameter: pair
    for pair in (
        # Not guarded: workers set CM_BASE_URL (a staging API, the emulator) for runs of
        # deployments made before base_url existed; the token then matches what
        # get_stac_token() there reads, as it always did.
        SettingPair("base_url", "base_url", DEFAULT_BASE_URL, api_identity, guarded=False),
        SettingPair("lifetime_days", "token_lifetime_days", DEFAULT_TOKEN_LIFETIME_DAYS),
        SettingPair("email_block", "email_block", DEFAULT_EMAIL_BLOCK),
        SettingPair("password_block", "password_block", DEFAULT_PASSWORD_BLOCK),
        SettingPair("token_block", "token_block", DEFAULT_TOKEN_BLOCK),
    )
}


def in_deployment_run() -> bool:
    """Whether the current flow run was started from a deployment (worker, serve, UI, schedule).

    A flow called from Python, a subflow included, has no deployment of its own.
    """
    context = FlowRunContext.get()
    return (
        context is not None
        and context.flow_run is not None
        and context.flow_run.deployment_id is not None
    )


_GIVEN: ContextVar[frozenset[str]] = ContextVar("cm_tasks_given_parameters", default=frozenset())


@contextmanager
def given_parameters(names: Collection[str]) -> Iterator[None]:
    """Within it, flows called from Python treat the named parameters as explicit.

    `cm-tasks refresh` calls the flow this way: every value it passes was an option or the
    command's own `CM_*` setting, even one equal to the package default, and must not be
    replaced by a setting.

    Example:
        ```python
        from cm_tasks.flows import refresh_stac_token
        from cm_tasks.run_parameters import given_parameters

        with given_parameters({"token_block"}):
            refresh_stac_token(token_block="carbon-mapper-stac-token")  # even if CM_TOKEN_BLOCK
        ```
    """
    token = _GIVEN.set(_GIVEN.get() | frozenset(names))
    try:
        yield
    finally:
        _GIVEN.reset(token)


def _run_parameters() -> frozenset[str]:
    """Names of the parameters the current deployment run was given (deployment or run)."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return frozenset()
    # The server stores the deployment's parameters merged with the run's own; the flow's
    # defaults are applied later, by the engine, and are not among them.
    return frozenset(context.flow_run.parameters or {})


def choose_values(
    settings: CarbonMapperSettings,
    parameters: Mapping[str, Any],
    *,
    deployment_run: bool | None = None,
) -> dict[str, Any]:
    """The value each parameter's run uses, by the rule in this module's docstring.

    Args:
        settings: the `CM_*` settings of this process.
        parameters: flow parameters by name; each must be a key of `PAIRS`.
        deployment_run: whether a deployment started the run; default: ask the run context.

    Returns:
        The chosen value per parameter name. Conflicts resolved for a Python call and
        parameters that override a setting are logged.

    Raises:
        ParameterConflictError: in a deployment run, a guarded parameter that neither the
            deployment nor the run sets is at its default while the worker's setting names
            something else; the message lists each and how to fix it.

    Example:
        ```python
        from cm_tasks.run_parameters import choose_values
        from cm_tasks.settings import load_settings

        chosen = choose_values(load_settings(), {"token_block": "carbon-mapper-stac-token"})
        print(chosen["token_block"])  # CM_TOKEN_BLOCK, when set, in a Python call
        ```
    """
    if deployment_run is None:
        deployment_run = in_deployment_run()
    given = _GIVEN.get() | (_run_parameters() if deployment_run else frozenset())
    logger = current_logger()
    chosen: dict[str, Any] = {}
    conflicts: list[str] = []
    worker_values: list[str] = []
    for name, value in parameters.items():
        pair = PAIRS[name]
        setting = getattr(settings, pair.field)
        chosen[name] = value
        if pair.same(setting, pair.default) or pair.same(setting, value):
            continue
        if name in given or not pair.same(value, pair.default):
            logger.warning(
                "%s=%r (the run's parameter) is used, not %s=%r of this process%s.",
                name,
                value,
                pair.variable,
                setting,
                _reader_note(pair, setting),
            )
        elif deployment_run and pair.guarded:
            conflicts.append(
                f"{name} is {value!r}, the package default the run form shows (neither the "
                f"deployment nor the run sets it), but this worker sets "
                f"{pair.variable}={setting!r}"
            )
            worker_values.append(f"{pair.variable}={setting}")
        else:
            chosen[name] = setting
            logger.info(
                "%s: using %s=%r (no explicit value was given).",
                name,
                pair.variable,
                setting,
            )
    if conflicts:
        raise ParameterConflictError(
            "The deployment's parameters and this worker's settings disagree, so the run "
            "stopped before any call: "
            + "; ".join(conflicts)
            + ". Make them agree: set the deployment parameter to the worker's value "
            f"(`{' '.join(worker_values)} cm-tasks deploy`, prefect.yaml `parameters:`, or the "
            "run form), or remove the variable from the worker's environment. The stored "
            "token is unchanged."
        )
    return chosen


def _reader_note(pair: SettingPair, setting: object) -> str:
    if pair.parameter != "token_block":
        return ""
    return f"; get_stac_token() in processes with that setting reads block {setting!r}"


def deployment_parameters(names: list[str], settings: CarbonMapperSettings) -> dict[str, Any]:
    """The deployment parameters that make a run form show this environment's settings.

    `CM_BASE_URL` included: the API a deployment's runs serve is the one it was deployed
    against, whatever the worker's own setting says.

    Settings set in the environment, or differing from the package default, are listed: the
    others are the flow's own defaults already. Use it where a deployment is made or served
    from an environment whose `CM_*` settings its runs will also see.

    Example:
        ```python
        from cm_tasks.run_parameters import deployment_parameters
        from cm_tasks.settings import load_settings

        print(deployment_parameters(["token_block"], load_settings()))  # {} when unset
        ```
    """
    found: dict[str, Any] = {}
    for name in names:
        pair = PAIRS[name]
        setting = getattr(settings, pair.field)
        # Set in the environment (even to the default: `CM_BASE_URL` naming production pins
        # it against a worker's own), or differing from the default the form would show.
        if pair.field in settings.model_fields_set or not pair.same(setting, pair.default):
            found[name] = setting
    return found
