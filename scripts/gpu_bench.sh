#!/usr/bin/env bash
# The decoding benchmark on a GPU in a few minutes, from a clean copy of this repository; figures -> JSON + markdown.
#
#   scripts/gpu_bench.sh                                   # cuda, bfloat16, figures in $OUT (else outputs/gpu_bench)
#   scripts/gpu_bench.sh --drafter outputs/train/runs/<run>/drafter --out /tmp/gpu
#   scripts/gpu_bench.sh --device cpu --dtype float32 --quick   # the dry path: same steps, tiny settings, on CPU
#
# Steps (each logged on stderr as "[gpu_bench] ..."):
#   1. a Python that imports torch, transformers, lightning, hydra, webdataset, PIL, matplotlib and tqdm, with CUDA
#      for --device cuda: $PYTHON, else ./.venv, else python3; if none does, a fresh ./.venv-bench installed as
#      README says (torch==2.13.0, then pip install -e .), which needs a reachable package index. Without the
#      project installed, PYTHONPATH points at this checkout.
#   2. a drafter: --drafter DIR, else the newest SpecVLM (select) export under outputs/ for the embedded target,
#      else one trained here with README command 1 (train.py; on cuda with trainer=gpu, --quick: 1 short epoch).
#   3. the benchmark (decode.py mode=bench) on the embedded target: HF AR, own AR, prompt lookup, HF assisted,
#      SpecVLM, at T = 0 and 1, with the batch rows (1 / 4 / 8); --quick: fewer prompts and tokens.
#   4. scripts/profile_round.py on the same device (where a round's time goes).
#   5. $OUT_DIR/environment.json (GPU, driver, versions) and $OUT_DIR/summary.md (environment + bench.md + profile).
# Exit status is non-zero, with the step named, if any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DEVICE=cuda
DTYPE=bfloat16
QUICK=0
OUT_DIR=${OUT:-$REPO/outputs/gpu_bench}
DRAFTER=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --drafter) DRAFTER=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
log() { echo "[gpu_bench] $*" >&2; }
fail() { echo "[gpu_bench] error: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------ 1. Python
check_python() {  # $1 = interpreter; prints what is missing, exit 0 when usable
  "$1" - "$DEVICE" <<'EOF'
import importlib, sys
missing = []
for mod in ("torch", "transformers", "lightning", "hydra", "omegaconf", "webdataset", "PIL", "matplotlib", "tqdm",
            "safetensors", "tokenizers"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{mod} ({type(e).__name__})")
if not missing and sys.argv[1].startswith("cuda"):
    import torch
    if not torch.cuda.is_available():
        missing.append(f"CUDA (torch {torch.__version__} sees no GPU)")
print(", ".join(missing))
sys.exit(1 if missing else 0)
EOF
}

PY=""
for cand in "${PYTHON:-}" "$REPO/.venv/bin/python" "$(command -v python3 || true)"; do
  [[ -n "$cand" && -x "$cand" ]] || continue
  if why=$(check_python "$cand"); then PY=$cand; break; fi
  log "$cand is not usable: missing $why"
done
if [[ -z "$PY" ]]; then
  log "no usable Python: installing into $REPO/.venv-bench as README says (needs a reachable package index)"
  python3 -m venv "$REPO/.venv-bench" || fail "step 1: python3 -m venv failed"
  "$REPO/.venv-bench/bin/pip" install -q torch==2.13.0 || fail "step 1: pip install torch==2.13.0 failed (offline?)"
  "$REPO/.venv-bench/bin/pip" install -q -e "$REPO" || fail "step 1: pip install -e . failed (offline?)"
  PY="$REPO/.venv-bench/bin/python"
  why=$(check_python "$PY") || fail "step 1: the fresh environment still lacks: $why"
fi
if ! "$PY" -c "import specvlm_lit" 2>/dev/null; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import specvlm_lit" || fail "step 1: specvlm_lit does not import from $REPO"
log "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=offline HF_HUB_OFFLINE=1

# ------------------------------------------------------------------------------------------------ 2. drafter
if [[ -z "$DRAFTER" ]]; then
  DRAFTER=$("$PY" - <<'EOF'
from specvlm_lit.decoding.pipeline import find_exported_drafters, pick_drafter
from specvlm_lit.target import TargetAdapter
fp = TargetAdapter.from_pretrained("data/embedded_target").fingerprint()
d = pick_drafter(find_exported_drafters("outputs", "specvlm"), fp)
print(d or "")
EOF
)
fi
if [[ -z "$DRAFTER" ]]; then
  train_args=(compressor=select)
  [[ "$DEVICE" == cuda* ]] && train_args+=(trainer=gpu)
  [[ $QUICK == 1 ]] && train_args+=(trainer.max_epochs=1 data.samples_per_epoch=512 callbacks.validation_decoding=null)
  log "no drafter given or exported: training one (python train.py ${train_args[*]}), log in $OUT_DIR/train.log"
  "$PY" train.py "${train_args[@]}" >"$OUT_DIR/train.log" 2>&1 || fail "step 2: train.py failed, see $OUT_DIR/train.log"
  DRAFTER=$(tail -n 1 "$OUT_DIR/train.log")
fi
[[ -f "$DRAFTER/config.json" ]] || fail "step 2: drafter $DRAFTER has no config.json"
log "drafter: $DRAFTER"

# ------------------------------------------------------------------------------------------------ 3. bench
bench_args=(mode=bench "device=$DEVICE" "dtype=$DTYPE" "bench.drafters.specvlm=$DRAFTER"
  "bench.methods=[ar,ar_own,prompt_lookup,assisted,specvlm]" "hydra.run.dir=$OUT_DIR/bench")
if [[ $QUICK == 1 ]]; then
  bench_args+=(bench.samples_per_resolution=2 bench.repeats=1 bench.max_new_tokens=16 "bench.batch_sizes=[1,2]"
    "bench.methods=[ar,ar_own,specvlm]")
fi
[[ "$DEVICE" == cpu ]] && bench_args+=(threads=2)
log "bench: python decode.py ${bench_args[*]}"
"$PY" decode.py "${bench_args[@]}" >"$OUT_DIR/bench.log" 2>"$OUT_DIR/bench.stderr" \
  || { tail -n 5 "$OUT_DIR/bench.stderr" >&2; fail "step 3: the benchmark failed, see $OUT_DIR/bench.stderr"; }
for f in bench.json bench.md bench.png; do
  [[ -f "$OUT_DIR/bench/$f" ]] || fail "step 3: the benchmark wrote no $f"
  cp "$OUT_DIR/bench/$f" "$OUT_DIR/$f"
done

# ------------------------------------------------------------------------------------------------ 4. profile
prof_args=(--device "$DEVICE" --dtype "$DTYPE" --drafter "$DRAFTER" --json "$OUT_DIR/profile_round.json")
[[ $QUICK == 1 ]] && prof_args+=(--prompts 2 --max-new-tokens 16)
[[ "$DEVICE" == cpu ]] && prof_args+=(--threads 2)
log "profile: python scripts/profile_round.py ${prof_args[*]}"
"$PY" scripts/profile_round.py "${prof_args[@]}" >"$OUT_DIR/profile_round.md" 2>"$OUT_DIR/profile_round.stderr" \
  || fail "step 4: profile_round.py failed, see $OUT_DIR/profile_round.stderr"

# ------------------------------------------------------------------------------------------------ 5. summary
"$PY" - "$OUT_DIR" "$DEVICE" "$DTYPE" "$DRAFTER" "$QUICK" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path
import torch, transformers
out, device, dtype, drafter, quick = sys.argv[1:]
out = Path(out)
env = {"device": device, "dtype": dtype, "drafter": drafter, "quick": quick == "1", "python": platform.python_version(),
       "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform()}
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name(0)
    env["cuda"] = torch.version.cuda
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        env["nvidia_smi"] = f"unavailable: {e}"
(out / "environment.json").write_text(json.dumps(env, indent=2))
parts = ["# GPU benchmark", "", "```json", json.dumps(env, indent=2), "```", "",
         (out / "bench.md").read_text(), "", "# Where a round's time goes (scripts/profile_round.py)", "",
         (out / "profile_round.md").read_text()]
(out / "summary.md").write_text("\n".join(parts))
EOF
log "done: $OUT_DIR/{bench.json,bench.md,bench.png,profile_round.json,profile_round.md,environment.json,summary.md}"
