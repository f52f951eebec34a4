#!/usr/bin/env bash
# The trainer image's CMD (installed as /usr/local/bin/wanforge-start).
#
# What it does depends on who started the container:
#   * SkyPilot (any SKYPILOT_* variable), RunPod (RUNPOD_POD_ID) or Vast (VAST_CONTAINERLABEL): nothing. The platform
#     runs the training itself (SkyPilot's `run:` section, or you in a terminal), so the container only stays up
#     with $WANFORGE_IDLE_CMD (default `sleep infinity`). Never trains.
#   * Anything else (`docker run`, a Kubernetes Job): trains the config at $WANFORGE_CONFIG
#     (default /workspace/config.toml) after checking the GPU stack, and exits with the trainer's status.
# Given arguments (`wanforge-start CMD ARGS...`), it runs that command instead, whoever started the container.
#
# Settings (environment):
#   WANFORGE_CONFIG          the config file to train (default /workspace/config.toml)
#   WANFORGE_RUN_DIR      run folder; overrides the config's train.output_dir (the image sets /outputs; empty: the
#                            config's own)
#   WANFORGE_RESUME          auto (default): `--resume latest` when the run folder already holds a checkpoint (a
#                            restarted container or pod carries on); never: always start fresh
#   WANFORGE_TRAIN_ARGS      extra arguments for `wanforge train`, split on spaces (e.g. "--set train.seed=1")
#   WANFORGE_SKIP_GPU_CHECK  1: skip the GPU check (a CPU run)
#   WANFORGE_DRY_RUN         1: check everything, print the command, exit 0 without training
#   WANFORGE_GPU_STACK       cuda | rocm (the image sets it; outside an image it is guessed)
#   WANFORGE_MIN_DRIVER      oldest NVIDIA driver this image's torch runs on (the image sets it from its build)
#   WANFORGE_MIN_ROCM        oldest ROCm this image's torch runs on (the ROCm image sets it)
#   WANFORGE_IDLE_CMD        what a hosted container runs instead of training, split on spaces, no shell syntax
#                            (default: sleep infinity)
#   WANFORGE_PYTHON          the Python used when no `wanforge` command is on PATH (default python3)
#
# Exit codes: the trainer's own; 2 for a problem the user fixes (no config, no GPU, a driver too old), with the fix.
set -euo pipefail

say() { printf 'wanforge-start: %s\n' "$*"; }
fail() { # fail LINE... : the problem and its fix on stderr, exit 2
    local line
    for line in "$@"; do printf 'wanforge-start: %s\n' "$line" >&2; done
    exit 2
}

# Dotted versions: is $1 >= $2 ? (570.86.15 >= 570, 10.0.0-12 >= 10.0)
version_ge() {
    local have="${1%%[-+~]*}" need="$2"
    [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" = "$need" ]
}

# ---------------------------------------------------------------- hosted: stay up, never train

hosted_by() {
    if compgen -e SKYPILOT_ > /dev/null; then echo "SkyPilot"; return; fi
    if [ -n "${RUNPOD_POD_ID:-}" ]; then echo "RunPod"; return; fi
    if [ -n "${VAST_CONTAINERLABEL:-}" ]; then echo "Vast"; return; fi
}

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

platform="$(hosted_by)"
if [ -n "$platform" ]; then
    say "started by $platform: not training here (the task's run command or your terminal starts \`wanforge train\`)."
    read -r -a idle <<< "${WANFORGE_IDLE_CMD:-sleep infinity}"  # split on spaces: a command, never shell text
    exec "${idle[@]}"
fi

# ---------------------------------------------------------------- the config

config="${WANFORGE_CONFIG:-/workspace/config.toml}"
if [ -d "$config" ]; then
    fail "$config is a folder, not a config file: docker creates a folder when the host file of a -v mount does not exist." \
         "Fix: check the host path of the mount, e.g. -v \"\$PWD/config.toml:$config:ro\" with config.toml present."
fi
if [ ! -f "$config" ]; then
    fail "no config at $config: nothing to train." \
         "Fix: mount one, e.g. docker run --gpus all -v \"\$PWD/config.toml:/workspace/config.toml:ro\" -v \"\$PWD/outputs:/outputs\" IMAGE" \
         "     (or set WANFORGE_CONFIG to its path; \`wanforge demo --out DIR\` writes a starting config)."
fi

# ---------------------------------------------------------------- the GPU stack

check_nvidia() {
    local min="${WANFORGE_MIN_DRIVER:-}" variant="${WANFORGE_IMAGE_VARIANT:-}" out driver
    if ! command -v nvidia-smi > /dev/null 2>&1; then
        fail "no NVIDIA GPU visible in this container (no nvidia-smi: the host driver is not mounted)." \
             "Fix: docker run --gpus all ... (NVIDIA Container Toolkit on the host); Kubernetes: request nvidia.com/gpu." \
             "     For a CPU-only trial set WANFORGE_SKIP_GPU_CHECK=1."
    fi
    if ! out="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1)"; then
        fail "nvidia-smi failed, so the GPU is not usable here: $(printf '%s' "$out" | head -n1)" \
             "Fix: check the host's NVIDIA driver (nvidia-smi on the host) and that the container got --gpus."
    fi
    driver="$(printf '%s\n' "$out" | head -n1 | tr -d '[:space:]')"
    if [ -z "$driver" ]; then
        fail "nvidia-smi lists no GPU." "Fix: docker run --gpus all ...; Kubernetes: request nvidia.com/gpu."
    fi
    if ! [[ "$driver" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
        fail "could not read the NVIDIA driver version (nvidia-smi said: $driver)." \
             "Fix: check the host's driver with nvidia-smi; WANFORGE_SKIP_GPU_CHECK=1 skips this check."
    fi
    if [ -n "$min" ] && ! version_ge "$driver" "$min"; then
        local lines=(
            "the NVIDIA driver on this host is $driver, too old for this image: its PyTorch (${variant:-this build}) needs driver >= $min."
            "Fix: run on a host with driver >= $min (RunPod: filter by CUDA version; Vast: max CUDA; Kubernetes: the node's"
            "     driver / GPU operator), or update the host driver."
        )
        if [ "$variant" = "cu130" ]; then
            lines+=("     Or use the -cu128 image of the same version, which needs driver >= 570.")
        fi
        fail "${lines[@]}"
    fi
    say "NVIDIA driver $driver${min:+ (this image needs >= $min)}: ok"
}

rocm_version() {
    local root="${ROCM_PATH:-/opt/rocm}" v=""
    if [ -r "$root/.info/version" ]; then
        v="$(head -n1 "$root/.info/version")"
    elif command -v rocm-sdk > /dev/null 2>&1; then  # ROCm installed as Python packages (TheRock)
        v="$(rocm-sdk version 2>/dev/null | head -n1)"
    fi
    printf '%s' "$v"
}

check_rocm() {
    local min="${WANFORGE_MIN_ROCM:-}" version driver=""
    version="$(rocm_version)"
    if [ -n "$min" ] && [[ "$version" =~ ^[0-9]+(\.[0-9]+)* ]] && ! version_ge "$version" "$min"; then
        fail "ROCm $version is installed here, but this image's PyTorch is built for ROCm >= $min." \
             "Fix: use the published ROCm image as is (do not mount the host's /opt/rocm over it), or rebuild with ROCM_VERSION=$min."
    fi
    if [ ! -e /dev/kfd ]; then
        fail "no AMD GPU visible in this container (/dev/kfd is missing)." \
             "Fix: docker run --device=/dev/kfd --device=/dev/dri --group-add video ...; Kubernetes: request amd.com/gpu." \
             "     For a CPU-only trial set WANFORGE_SKIP_GPU_CHECK=1."
    fi
    if [ -r /sys/module/amdgpu/version ]; then driver="$(cat /sys/module/amdgpu/version)"; fi
    if ! timeout 180 "${WANFORGE_PYTHON:-python3}" -c \
        'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)'; then
        fail "PyTorch (ROCm ${version:-?}) finds no usable GPU although /dev/kfd is present; host amdgpu driver: ${driver:-unknown}." \
             "Fix: the host's AMD GPU driver is probably too old for ROCm ${version:-of this image}: install the amdgpu driver" \
             "     listed for it in the ROCm compatibility matrix, or run on a host that has it; also check --group-add video."
    fi
    say "ROCm ${version:-?} (amdgpu driver ${driver:-inbox}): GPU visible, ok"
}

if [ "${WANFORGE_SKIP_GPU_CHECK:-0}" = "1" ]; then
    say "GPU check skipped (WANFORGE_SKIP_GPU_CHECK=1)."
else
    stack="${WANFORGE_GPU_STACK:-}"
    if [ -z "$stack" ]; then
        if command -v nvidia-smi > /dev/null 2>&1; then
            stack=cuda
        elif [ -e /dev/kfd ] || [ -d "${ROCM_PATH:-/opt/rocm}" ]; then
            stack=rocm
        fi
    fi
    case "$stack" in
        cuda) check_nvidia ;;
        rocm) check_rocm ;;
        *) fail "no GPU found (neither nvidia-smi nor /dev/kfd)." \
                "Fix: start the container with its GPUs (NVIDIA: --gpus all; AMD: --device=/dev/kfd --device=/dev/dri)," \
                "     or set WANFORGE_SKIP_GPU_CHECK=1 to train on the CPU (tiny trials only)." ;;
    esac
fi

# ---------------------------------------------------------------- the command

if command -v wanforge > /dev/null 2>&1; then
    cmd=(wanforge train "$config")
else
    cmd=("${WANFORGE_PYTHON:-python3}" -m trainer.cli train "$config")
fi

output_dir="${WANFORGE_RUN_DIR:-}"
if [ -n "$output_dir" ]; then
    case "$output_dir" in /*) ;; *) output_dir="$PWD/$output_dir" ;; esac  # the trainer would read it from the config's folder
    cmd+=(--set "train.output_dir=$output_dir")
    say "run folder: $output_dir (WANFORGE_RUN_DIR; set it empty to use the config's train.output_dir)"
fi

# Resume only where a finished checkpoint exists (checkpoints/step-N; a half-written one has another name).
resume="${WANFORGE_RESUME:-auto}"
if [ "$resume" = "auto" ]; then
    run_dir="$output_dir"
    if [ -z "$run_dir" ]; then  # the config's own train.output_dir, resolved as the trainer resolves it
        run_dir="$("${WANFORGE_PYTHON:-python3}" -c \
            'import sys; from trainer.config.files import load_config; print(load_config(sys.argv[1]).train.output_dir)' \
            "$config" 2>/dev/null || true)"
    fi
    if [ -n "$run_dir" ]; then
        for ckpt in "$run_dir"/checkpoints/step-*; do
            if [ -d "$ckpt" ] && [[ "${ckpt##*/}" =~ ^step-[0-9]+$ ]]; then
                cmd+=(--resume latest)
                say "found $ckpt: resuming from the latest checkpoint (WANFORGE_RESUME=never starts fresh)"
                break
            fi
        done
    fi
elif [ "$resume" != "never" ]; then
    cmd+=(--resume "$resume")
fi

if [ -n "${WANFORGE_TRAIN_ARGS:-}" ]; then
    read -r -a extra <<< "$WANFORGE_TRAIN_ARGS"
    cmd+=("${extra[@]}")
fi

if [ "${WANFORGE_DRY_RUN:-0}" = "1" ]; then
    say "dry run, would run: ${cmd[*]}"
    exit 0
fi
say "running: ${cmd[*]}"
exec "${cmd[@]}"
