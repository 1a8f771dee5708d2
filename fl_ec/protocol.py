"""Every key of the Flower messages between the ServerApp's strategies and the ClientApp.

A message's content is a ``RecordDict`` of named records; the names below are the
records' names and the keys inside them. Both sides read and write them through
these constants only.

Record names follow Flower's ``FedAvg``: its ``arrayrecord_key`` and
``configrecord_key`` default to :data:`ARRAY_RECORD_KEY` and :data:`CONFIG_RECORD_KEY`,
it writes :data:`SERVER_ROUND_KEY` into every train and evaluate config, and weights
replies by :data:`NUM_EXAMPLES_KEY` (its ``weighted_by_key``). FedEC and FedHCE keep
FedAvg's arguments; the fl-ec ClientApp uses the defaults.

**train** (server -> client)

* ``ARRAY_RECORD_KEY``: the model's arrays. FedHCE sends each node its variant:
  quantized weights packed as :func:`fl_ec.compression.wire.pack_state_dict` lays them
  out (integers plus per-channel scales).
* ``CONFIG_RECORD_KEY``: ``SERVER_ROUND_KEY``; ``ARCH_SPEC_KEY`` (the model's JSON
  spec: the client rebuilds the model from it and the arrays); ``LR_KEY`` and
  ``LOCAL_EPOCHS_KEY`` (the ClientApp falls back to its run-config without them); and
  from FedHCE ``VARIANT_KEY`` (the variant's name) and ``WIRE_MANIFEST_KEY`` (the JSON
  manifest of the packed arrays, which the client unpacks and trains in fp32);
  for a model given as ``model_builder`` (no spec), a pruned variant's
  ``PRUNING_KEY`` (the JSON pruning decision the client replays on a fresh model,
  :meth:`fl_ec.compression.PrunedStructure.decision_json`).

**train reply** (client -> server)

* ``ARRAY_RECORD_KEY``: the trained model's arrays.
* ``METRIC_RECORD_KEY``: ``NUM_EXAMPLES_KEY``, ``TRAIN_LOSS_KEY``,
  ``TRAIN_SECONDS_KEY``, ``TRAINER_STAGES_KEY`` (1 for plain SGD; the stages the
  layer-parallel trainer used).
* ``TRAIN_INFO_KEY`` (config record): ``ARCH_SPEC_KEY`` the model was trained as,
  ``CLASS_COUNTS_KEY`` of the node's training partition, ``VARIANT_KEY`` it trained
  (empty for the full model). FedEC builds ensemble members and label-aware teachers
  from it.
* ``CAPABILITY_KEY`` (config record): what the node is, ``DEVICE_KIND_KEY``,
  ``DEVICE_TIER_KEY``, ``MEMORY_MB_KEY``, ``CPU_THREADS_KEY``, ``SPEED_KEY``. The
  server cannot read a node's ``node_config``; FedHCE assigns variants from this.

**evaluate** (server -> client): ``ARRAY_RECORD_KEY``; ``CONFIG_RECORD_KEY`` with
``SERVER_ROUND_KEY`` and ``ARCH_SPEC_KEY``. **Reply**: ``METRIC_RECORD_KEY`` with
``NUM_EXAMPLES_KEY``, ``EVAL_LOSS_KEY``, ``EVAL_ACC_KEY``.

**query: describe** (:mod:`fl_ec.run.sampling`, before the first round):
``CONFIG_RECORD_KEY`` with ``DESCRIBE_KEY=True``. **Reply**: ``NODE_INFO_KEY`` (config
record) with ``PARTITION_ID_KEY`` (a ``data-dir`` node given none: a digest of its
data) and the partition's ``CLASS_COUNTS_KEY``, and ``CAPABILITY_KEY`` as a training
reply carries it. Seeded client sampling learns the node -> partition map this way, and
hands the capabilities to whoever assigns by tier.

**query: feature statistics** (FedEC's feature calibration,
:mod:`fl_ec.calibration`): ``ARRAY_RECORD_KEY`` (the served model, or a FedHCE
variant packed as for training); ``CONFIG_RECORD_KEY`` with ``SERVER_ROUND_KEY``,
``ARCH_SPEC_KEY``, ``STATS_RECORD_KEY=True`` and which statistics to measure:
``STATS_LAYERS_KEY`` (``classifier`` or ``dense``), ``STATS_RANK_KEY``,
``STATS_COMPONENTS_KEY`` (plus FedHCE's variant keys for a variant). **Reply**:
``STATS_RECORD_KEY`` (array record: the statistics in
:meth:`fl_ec.calibration.FeatureStatistics.to_arrays`'s wire form) and ``METRIC_RECORD_KEY``
with ``NUM_EXAMPLES_KEY`` and ``STATS_SECONDS_KEY``.

The layouts *inside* a payload -- the packed arrays and their manifest, the
statistics' arrays -- are defined by the codec pair that writes and reads them
(:mod:`fl_ec.compression.wire`, :class:`fl_ec.calibration.FeatureStatistics`), which both
sides call.
"""

# -- record names ---------------------------------------------------------------------
ARRAY_RECORD_KEY = "arrays"
CONFIG_RECORD_KEY = "config"
METRIC_RECORD_KEY = "metrics"
TRAIN_INFO_KEY = "train-info"
CAPABILITY_KEY = "capability"
NODE_INFO_KEY = "node-info"
# The feature-statistics reply's array record, and the query config flag asking for it.
STATS_RECORD_KEY = "feature-stats"

# -- config keys: train, evaluate and query configs -------------------------------------
SERVER_ROUND_KEY = "server-round"
ARCH_SPEC_KEY = "arch-spec"
LR_KEY = "lr"
LOCAL_EPOCHS_KEY = "local-epochs"
VARIANT_KEY = "variant"
WIRE_MANIFEST_KEY = "wire-manifest"
PRUNING_KEY = "pruning"
DESCRIBE_KEY = "describe"
STATS_LAYERS_KEY = "feature-stats-layers"
STATS_RANK_KEY = "feature-stats-rank"
STATS_COMPONENTS_KEY = "feature-stats-components"

# -- keys of the reply config records (train-info, capability, node-info) -------------
CLASS_COUNTS_KEY = "class-counts"
PARTITION_ID_KEY = "partition-id"
DEVICE_KIND_KEY = "device-kind"
DEVICE_TIER_KEY = "device-tier"
MEMORY_MB_KEY = "memory-mb"
CPU_THREADS_KEY = "cpu-threads"
SPEED_KEY = "speed"

# -- metric keys of the replies ---------------------------------------------------------
NUM_EXAMPLES_KEY = "num-examples"
TRAIN_LOSS_KEY = "train-loss"
TRAIN_SECONDS_KEY = "train-seconds"
TRAINER_STAGES_KEY = "trainer-stages"
EVAL_LOSS_KEY = "eval-loss"
EVAL_ACC_KEY = "eval-acc"
STATS_SECONDS_KEY = "stats-seconds"
