"""SkyPilot's failures as one line each: what failed and what to do (docs/runs.md: exit 2; exit 1 stays for bugs).

SkyPilot raises its own exception classes (sky.exceptions) on the client, the API server's included (it serializes
them and the client raises the same class). `failure_line` names the ones a launch, status, logs or down meets:
credentials, quota, no capacity, an unreachable cloud or API server, a node whose setup or image pull failed, a
bucket it cannot use. Any other exception of sky.exceptions is still one line; anything else is not SkyPilot's
failure and is left to raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Context:
    """What the failing call was about, for the line: the run (cluster / managed job) and its target."""

    run: str
    target: str
    accelerator: str = ""
    output: str = ""


def detail(err: BaseException, limit: int = 300) -> str:
    """The exception's first meaningful line, colour codes removed."""
    for line in _ANSI.sub("", str(err)).splitlines():
        line = line.strip(" \t-:")
        if line:
            return line[:limit] + ("..." if len(line) > limit else "")
    return type(err).__name__


def _text(err: BaseException) -> str:
    """Everything the exception says, with the failover history of a ResourcesUnavailableError (each region's why)."""
    parts = [str(err)] + [str(e) for e in getattr(err, "failover_history", []) or []]
    parts += [str(e) for e in getattr(err, "reasons", []) or []]  # ProvisionPrechecksError
    return _ANSI.sub("", "\n".join(parts)).lower()


_QUOTA = ("quota", "limitexceeded", "vcpulimitexceeded", "insufficient quota")
_IMAGE = ("imagepullbackoff", "errimagepull", "pull access denied", "manifest unknown", "failed to pull",
          "error pulling image", "image not found", "pull image")


def failure_line(err: BaseException, ctx: Context) -> str | None:
    """One line for a SkyPilot failure, or None when `err` is not one (a bug: let it raise)."""
    import requests
    from sky import exceptions as ex

    from launcher.readiness import CLOUDS, RSYNC_LINE

    what = detail(err)
    text = _text(err)
    target, run = ctx.target, ctx.run
    gpu = ctx.accelerator or "the GPU"
    fix = CLOUDS[target].fix if target in CLOUDS else "set up the cloud's credentials"
    if isinstance(err, RuntimeError) and "`rsync` is required" in str(err):
        return RSYNC_LINE
    if isinstance(err, (ex.InvalidCloudCredentials, ex.CloudUserIdentityError, ex.NoCloudAccessError,
                        ex.InvalidCloudConfigs)):
        return (f"--target {target}: SkyPilot cannot use your {target} credentials ({what}): {fix}; "
                f"`sky check {target}` must then list {target} as enabled")
    if isinstance(err, ex.KubeAPIUnreachableError):
        return (f"--target kubernetes: the cluster's API is unreachable ({what}): check KUBECONFIG and that "
                "`kubectl get nodes` answers, then launch again")
    if isinstance(err, (ex.ResourcesUnavailableError, ex.ProvisionPrechecksError, ex.ManagedJobReachedMaxRetriesError)):
        if any(k in text for k in _IMAGE):
            return _image_line(target, what)
        if any(k in text for k in _QUOTA):
            return (f"--target {target}: your {target} account's quota does not allow {gpu} ({what}): ask {target} "
                    "for a GPU quota increase in that region, or choose another --gpu or --target")
        return (f"--target {target}: no {gpu} could be provisioned on {target} now ({what}): try again later, "
                f"another --gpu (`sky show-gpus --cloud {target}` lists them) or another --target; SkyPilot "
                "released whatever it had started")
    if isinstance(err, (ex.NotSupportedError, ex.ProvisionUnsupportedError, ex.ResourcesMismatchError)):
        return (f"--target {target}: SkyPilot cannot run this request there ({what}): see the table in "
                "docs/cloud.md for what each target supports")
    if isinstance(err, (ex.ClusterSetUpError, ex.CommandError)):
        if any(k in text for k in _IMAGE):
            return _image_line(target, what)
        return (f"{run}: the node's setup failed ({what}): read the log above (or `sky logs {run}`), fix the cause "
                "and launch again")
    if isinstance(err, (ex.StorageError, ex.StorageSpecError)):
        return (f"--output {ctx.output or '(bucket)'}: SkyPilot could not use the bucket ({what}): check that it "
                f"exists and that your {target} credentials can write it")
    if isinstance(err, ex.ClusterDoesNotExist):
        return f"{run}: SkyPilot has no cluster of that name (already down, or it never started)"
    if isinstance(err, ex.ClusterNotUpError):
        return f"{run}: the cluster is not up ({what}): `wanforge status {run}` shows it"
    if isinstance(err, (ex.ApiServerConnectionError, ex.ApiServerAuthenticationError, ex.APIVersionMismatchError,
                        ex.ServerTemporarilyUnavailableError)):
        return (f"the SkyPilot API server failed ({what}): run `sky api stop`, then the command again "
                "(its log: ~/.sky/api_server/server.log)")
    if isinstance(err, (ex.NetworkError, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        ConnectionError, TimeoutError)):
        return (f"network: SkyPilot could not reach {target} ({what}): check this machine's connection (proxy, VPN, "
                "firewall) and run the command again")
    if isinstance(err, ex.InvalidSkyPilotConfigError):
        return f"~/.sky/config.yaml: SkyPilot rejects it ({what}): fix or move that file"
    if isinstance(err, (ex.PermissionDeniedError, ex.UserRequestRejectedByPolicy)):
        return f"SkyPilot refused the request ({what}): ask whoever runs your SkyPilot server for access"
    if isinstance(err, ex.RequestCancelled):
        return f"{run}: the SkyPilot request was cancelled ({what})"
    if type(err).__module__ == ex.__name__:
        return f"SkyPilot failed: {type(err).__name__}: {what}"
    return None


def _image_line(target: str, what: str) -> str:
    return (f"--target {target}: the node could not pull the trainer image ({what}): check that the image exists and "
            "is public, or that the node can log in to its registry (docs/containers.md: your own image)")
