"""Which value a flow run uses: its parameter, or the `CM_*` setting of the process running it.

The deployable flows' parameters default to the package defaults, so the UI's run form shows
what a run uses. The `CM_*` settings name the same things for code that uses the package
directly - `get_stac_token()` reads the token from the block `CM_TOKEN_BLOCK` names. Each pair
(`lifetime_days` and `CM_TOKEN_LIFETIME_DAYS`, `email_block` and `CM_EMAIL_BLOCK`,
`password_block` and `CM_PASSWORD_BLOCK`, `token_block` and `CM_TOKEN_BLOCK`) follows one rule:

    parameter      setting         the run uses
    -------------  --------------  -----------------------------------------------------------
    default        unset/default   the default
    X              unset/default   X
    X              X               X
    X              Y               X, with a warning (get_stac_token() there reads Y)
    default        Y               called from Python (no deployment): Y, logged
                                   deployment run: ParameterConflictError before any call

A value equal to the package default counts as "left at the default": a run cannot tell a
default the run form filled in from one a person typed. In a deployment run that ambiguity is
an error, not a guess: the form showed the default, and a run that wrote Y would make the form
wrong, while one that wrote the default would leave `get_stac_token()` on that worker reading Y.
Either would go unnoticed until ingest found an old token. Failing before any call keeps the
stored token, says how to make the two agree, and the daily watchdog still sees the old token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefect.context import FlowRunContext

from cm_tasks._logging import current_logger
from cm_tasks.errors import ConfigurationError
from cm_tasks.settings import (
    DEFAULT_EMAIL_BLOCK,
    DEFAULT_PASSWORD_BLOCK,
    DEFAULT_TOKEN_BLOCK,
    DEFAULT_TOKEN_LIFETIME_DAYS,
    ENV_PREFIX,
    CarbonMapperSettings,
)


class ParameterConflictError(ConfigurationError):
    """A deployment run left a parameter at its default while the worker's setting differs."""


@dataclass(frozen=True)
class SettingPair:
    """A flow parameter, the settings field that matches it, and their shared default."""

    parameter: str
    field: str
    default: object

    @property
    def variable(self) -> str:
        """The environment variable of the setting, e.g. `CM_TOKEN_BLOCK`."""
        return f"{ENV_PREFIX}{self.field.upper()}"


PAIRS: dict[str, SettingPair] = {
    pair.parameter: pair
    for pair in (
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
        ParameterConflictError: in a deployment run, a parameter is at its default while its
            setting names something else; the message lists each and how to fix it.

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
    logger = current_logger()
    chosen: dict[str, Any] = {}
    conflicts: list[str] = []
    for name, value in parameters.items():
        pair = PAIRS[name]
        setting = getattr(settings, pair.field)
        chosen[name] = value
        if setting == pair.default or setting == value:
            continue
        if value != pair.default:
            logger.warning(
                "%s=%r (the run's parameter) is used, not %s=%r of this process%s.",
                name,
                value,
                pair.variable,
                setting,
                _reader_note(pair, setting),
            )
        elif deployment_run:
            conflicts.append(
                f"{name} is {value!r}, the package default the run form shows, but this "
                f"worker sets {pair.variable}={setting!r}"
            )
        else:
            chosen[name] = setting
            logger.info(
                "%s: using %s=%r (the parameter was left at its default).",
                name,
                pair.variable,
                setting,
            )
    if conflicts:
        raise ParameterConflictError(
            "The deployment's parameters and this worker's settings disagree, so the run "
            "stopped before any call: "
            + "; ".join(conflicts)
            + ". Make them agree: deploy again with the worker's settings (e.g. "
            "`CM_TOKEN_BLOCK=... cm-tasks deploy`, which makes them the deployment's "
            "parameters), set the parameter in prefect.yaml `parameters:` or the run form, or "
            "remove the variable from the worker's environment. The stored token is unchanged."
        )
    return chosen


def _reader_note(pair: SettingPair, setting: object) -> str:
    if pair.parameter != "token_block":
        return ""
    return f"; get_stac_token() in processes with that setting reads block {setting!r}"


def deployment_parameters(names: list[str], settings: CarbonMapperSettings) -> dict[str, Any]:
    """The deployment parameters that make a run form show this environment's settings.

    Only settings that differ from the package default are listed: the others are the flow's
    own defaults already. Use it where a deployment is made or served from an environment
    whose `CM_*` settings its runs will also see.

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
        if setting != pair.default:
            found[name] = setting
    return found
