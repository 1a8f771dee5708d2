"""FedEC: aggregate by ensembling client outputs on a proxy set, compress by distillation.

EC-DNN's rule (Sun et al. 2017) on a Flower server, in the spirit of FedDF (Lin et al.
2020): each round the clients' models form an ensemble *teacher* on the server's
unlabeled proxy set, and the teacher is compressed back into one model of the local
size by distillation, starting from the parameter average. The algorithm lives in
:mod:`fl_ec.ensemble` and :mod:`fl_ec.distill`; this class is the Flower glue.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterable
from logging import DEBUG, INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_ec.calibration import (
    CalibrationSettings,
    FeatureStats,
    calibration_every,
    classifier_of,
    target_prior,
)
from fl_ec.checkpoint import StrategyState, tensors_under
from fl_ec.config import CLIENT_STARTS
from fl_ec.data.batches import input_tensor, labelled_tensors
from fl_ec.data.tensor_data import TensorData
from fl_ec.distill import DistillResult, DistillSettings, distill
from fl_ec.ensemble import RULES, WEIGHTED_RULES, teacher_logits
from fl_ec.errors import ModelSpecError
from fl_ec.models.layout import probe_channels_last
from fl_ec.models.spec import ArchSpec, build_from_state_dict, build_model, state_shapes
from fl_ec.protocol import (
    ARCH_SPEC_KEY,
    SERVER_ROUND_KEY,
    STATS_COMPONENTS_KEY,
    STATS_LAYERS_KEY,
    STATS_RANK_KEY,
    STATS_RECORD_KEY,
)
from fl_ec.results import RunRecorder
from fl_ec.robust import StartRule, WeightedMean, check_trim
from fl_ec.run.wrapper import BeginsRunOnStart
from fl_ec.scoring import accuracy, model_accuracy, model_hits
from fl_ec.strategies.acceptance import (
    AcceptedReplies,
    accept_evaluate_replies,
    accept_stats_replies,
    accept_train_replies,
)
from fl_ec.strategies.degraded import (
    ADD_CLASS_COUNTS,
    ADD_FEATURE_STATS,
    DegradedFeatures,
    all_class_counts,
    nodes_without_counts,
)
from fl_ec.strategies.fedec_calibration import serve_feature_calibrated, serve_prior_corrected
from fl_ec.strategies.fedec_utils import (
    ClientModel,
    aggregatable_metrics,
    group_by_spec,
    is_finite_state,
)
from fl_ec.strategies.replies import (
    Expected,
    ReplyLimits,
    parse_stats_reply,
    parse_train_reply,
    shapes_of_state,
    spec_bounds,
)
from fl_ec.training import select_device


class FedEC(BeginsRunOnStart, FedAvg):
    """Ensemble-Compression federated averaging: a drop-in replacement for ``FedAvg``.

    Beyond ``FedAvg``'s result it reports to the ServerApp
    (:class:`~fl_ec.run.reporting.RunReporter`): ``server_metrics`` per round,
    and :meth:`save_artifacts`, EC-DNN's ensemble of the last round's client models.

    It keeps ``FedAvg``'s contract: given the same replies, FedEC with
    ``distill.steps=0``, no calibration and a model without BatchNorm returns
    ``FedAvg``'s arrays bit for bit, and with any settings the same train and evaluate
    metrics (``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn`` over the
    accepted replies, the weighting key not reported). It aggregates whatever
    replies arrive, a single one included; with none it returns ``(None, None)``, so
    an evaluation-only run (``fraction_train=0.0``) works.

    Differences from FedAvg
    -----------------------
    * **Replies are checked one by one, before anything is built from them**
      (:mod:`~fl_ec.strategies.replies`: metrics, spec, class counts, array headers,
      then finite values). Where ``FedAvg`` raises ``InconsistentMessageReplies`` (and
      the run ends) because of one malformed reply, FedEC rejects that reply alone,
      logs the node id and the reason, counts it in the round's ``rejected-replies``
      and goes on; a node's second reply in a round is rejected too. An aggregate
      that is not finite keeps the global model. ``FedAvg`` logs error replies at
      INFO; FedEC at WARNING.
    * **Replies may differ where FedAvg needs them alike.** A reply's only
      ArrayRecord is its model whatever its name, as in ``FedAvg``, and the names may
      differ between replies; with several ArrayRecords, the one named
      ``arrayrecord_key`` is used. Replies of a smaller architecture join the teacher and
      stay out of the parameter average. A metric that not every accepted reply
      reports alike (same key, a number in all or a list of one length in all) is left
      out of the aggregated metrics with a warning, where ``FedAvg`` fails the round.
      A custom ``*_metrics_aggr_fn`` that raises ends the round, as in ``FedAvg``.
    * **An optional quorum.** ``min_valid_replies`` (default 1: ``FedAvg``'s
      behaviour) keeps the global model unchanged, ``(None, None)``, in a round with
      fewer accepted replies. ``min_train_nodes`` means what it means to ``FedAvg``:
      the fewest nodes sampled.
    * **The served model is the distilled student.** With ``distill.steps=0`` it is
      the parameter average, except that BatchNorm running statistics are re-estimated
      on the proxy set (``DistillSettings.recalibrate_bn``), integer buffers are
      rounded back to their dtype (``FedAvg`` returns them as float64), and a
      calibration, when configured, changes the head.
    * **Features that need client support degrade.** The ``gated`` and ``label-aware``
      teachers and the ``prior`` correction need class counts in the replies, feature
      calibration needs clients that answer its statistics query. A stock ClientApp
      (arrays and metrics only) works: the teacher runs as ``mean-logits``, the
      correction or calibration is skipped, and a warning says once per run which
      feature is off and what the ClientApp must add.

    Parameters
    ----------
    proxy_data : Tensor | Dataset | DataLoader
        Unlabeled server-side inputs, normalised as the model expects, from data that
        is neither the clients' nor the test set (:func:`fl_ec.data.hold_out`). A
        ``Dataset``/``DataLoader`` may yield ``x``, ``(x, y)`` or dicts such as
        flwr-datasets' ``{"img": x, "label": y}`` (:mod:`fl_ec.data.batches`); labels
        are ignored.
    arch_spec : ArchSpec | str | None
        The global model's architecture (object or JSON). Give this or ``model_builder``.
    model_builder : Callable[[], nn.Module] | None
        Builds a fresh global model (e.g. quickstart's ``Net``); replies are loaded
        into it. Used when no spec is given. Its class runs channels-last on the server
        only if a first forward on proxy inputs gives the same result that way
        (:func:`fl_ec.models.probe_channels_last`).
    validation_data : tuple[Tensor, Tensor] | Dataset | DataLoader | None
        Labelled server-side data (the same shapes as ``proxy_data``, with labels) for
        early stopping and per-round validation metrics. Without it distillation runs
        all ``distill.steps`` and keeps the last student.
    distill : DistillSettings
        Steps, batch size, Adam lr, temperature, evaluation interval and patience.
    teacher_rule : str (default: "gated")
        One of ``mean-logits``, ``label-aware``, ``gated`` (see :mod:`fl_ec.ensemble`).
        ``label-aware`` and ``gated`` fall back to ``mean-logits`` in a round where
        some reply lacks class counts (a warning, once per run, says so).
    teacher_trim : float (default: 0)
        Per proxy sample, the teacher leaves out the ``teacher_trim`` client models (a
        count, or a fraction of the round's clients) whose outputs lie farthest from the
        clients' median (:func:`fl_ec.ensemble.combine`): the number of malicious
        clients the teacher tolerates. With class counts, a client's distance shrinks
        by its share of the sample's class, so the few holders of a rare class stay.
    client_start : str (default: "average")
        What the next round's clients train from. ``student``: the distilled model
        (FedDF, EC-DNN). ``average``: the parameter average of this round's replies, so
        the clients follow FedAvg's trajectory while the distilled (and calibrated)
        student is the global model that is evaluated, served and returned ("train the
        average, serve the student"); BENCHMARKS.md compares the two.
    calibration : str | CalibrationSettings | None (default: None, no calibration)
        What is done to the served model after distillation: a preset name of
        :meth:`~fl_ec.calibration.CalibrationSettings.preset` (``none``, ``prior``,
        ``classifier``, ``dense``, ``dense-mixture``) or the settings themselves.
        ``prior`` shifts the classifier bias to the federation's label distribution,
        pooled from the replies' class counts (:mod:`fl_ec.calibration.prior`).
        ``features`` methods ask the clients for class-conditional statistics of the
        served model's features in a ``query`` message after the round's aggregation,
        and retrain the head on virtual features drawn from them
        (:mod:`fl_ec.calibration.gaussian`, :mod:`fl_ec.calibration.low_rank`). With
        validation data a calibration is reverted when the uncalibrated model is
        significantly more accurate (McNemar's paired test). The settings' ``rounds``
        (``all``, ``last``, ``every-N``) say which rounds are calibrated, its ``nodes``
        which clients are asked (``sampled`` or ``all``). Clients that cannot answer
        are left out, named once per run. docs/calibration.md explains each method.
    proxy_per_round : int (default: 0)
        Use a fresh seeded random subset of this many proxy samples each round for the
        teacher and distillation (0: the whole proxy set). Bounds server time per round
        while, over the run, every proxy sample is used.
    proxy_batch_size : int (default: 512)
        Batch size of the teacher's forward passes.
    device : str (default: "auto")
        ``auto`` uses CUDA when available.
    seed : int (default: 0)
        Seeds the per-round proxy subset and distillation batch order.
    student_trainer : Callable[[nn.Module, Tensor, Tensor], None] | None
        Replaces the Adam distillation: ``student_trainer(student, proxy, teacher_logits)``
        trains the student in place (e.g. the layer-parallel trainer with a KL loss);
        the better of start and result on validation is kept.
    min_valid_replies : int (default: 1)
        The fewest accepted replies a round aggregates; with fewer, ``aggregate_train``
        returns ``(None, None)`` and the global model stays. 1 aggregates whatever
        valid replies arrive, as ``FedAvg`` does.
    reply_limits : ReplyLimits | None
        What one reply may claim: the largest ``num-examples`` and how closely class
        counts must sum to it (:class:`~fl_ec.strategies.replies.ReplyLimits`).
    start_rule : StartRule | None (default: ``WeightedMean()``, FedAvg's)
        How the same-architecture replies are averaged into the student's start (and,
        with ``client_start="average"``, the clients' next model); the robust rules of
        :mod:`fl_ec.robust` bound what a few malicious replies can do.
    **fedavg_kwargs
        Every ``FedAvg`` argument (``fraction_train``, ``min_train_nodes``,
        ``weighted_by_key``, ``arrayrecord_key``, ``train_metrics_aggr_fn``,
        ``evaluate_metrics_aggr_fn``, ...), passed to ``FedAvg`` unchanged and used as
        ``FedAvg`` uses them.
    """

    def __init__(
        self,
        *,
        proxy_data: torch.Tensor | Dataset | DataLoader,
        arch_spec: ArchSpec | str | None = None,
        model_builder: Callable[[], nn.Module] | None = None,
        validation_data: tuple[torch.Tensor, torch.Tensor] | Dataset | DataLoader | None = None,
        distill: DistillSettings | None = None,
        teacher_rule: str = "gated",
        teacher_trim: float = 0,
        client_start: str = "average",
        calibration: str | CalibrationSettings | None = None,
        proxy_per_round: int = 0,
        proxy_batch_size: int = 512,
        device: str = "auto",
        seed: int = 42,
        student_trainer: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None,
        min_valid_replies: int = 1,
        reply_limits: ReplyLimits | None = None,
        start_rule: StartRule | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if min_valid_replies < 1:
            raise ValueError(f"min_valid_replies={min_valid_replies} must be >= 1")
        self.min_valid_replies = min_valid_replies
        self.reply_limits = reply_limits or ReplyLimits()
        self.start_rule = start_rule or WeightedMean()
        self.degraded = DegradedFeatures()
        if arch_spec is None and model_builder is None:
            raise ValueError("FedEC needs arch_spec or model_builder to rebuild client models")
        if teacher_rule not in RULES:
            raise ValueError(f"teacher_rule={teacher_rule!r}: choose one of {', '.join(RULES)}")
        if client_start not in CLIENT_STARTS:
            raise ValueError(f"client_start={client_start!r}: choose student or average")
        self.arch_spec = ArchSpec.from_json(arch_spec) if isinstance(arch_spec, str) else arch_spec
        self.model_builder = model_builder
        self.proxy_inputs = input_tensor(proxy_data, name="proxy_data")
        self.validation = labelled_tensors(validation_data) if validation_data is not None else None
        # What a reply's arrays must be, fixed now so that a reply is checked against
        # the configured model, not against anything a client sent.
        reference = build_model(self.arch_spec) if self.arch_spec else model_builder()  # type: ignore[misc]
        self.reference_bounds = shapes_of_state(reference.state_dict())
        self.num_classes = _num_outputs(reference)
        if arch_spec is None and len(self.proxy_inputs):
            # A user's model may .view() a conv output, which fails channels-last.
            probe_channels_last(reference, self.proxy_inputs[:8])
        self.distill_settings = distill or DistillSettings()
        self.teacher_rule = teacher_rule
        try:
            check_trim(teacher_trim)
        except ValueError as err:
            raise ValueError(f"teacher_trim: {err}") from None
        self.teacher_trim = teacher_trim
        self.client_start = client_start
        # With client_start="average": the model the next round's clients train from.
        self.client_start_arrays: ArrayRecord | None = None
        if not isinstance(calibration, CalibrationSettings):
            calibration = CalibrationSettings.preset(calibration or "none")
        self.calibration = calibration
        self.feature_statistics = calibration.statistics()  # what feature calibration uses
        self.corrects_prior = calibration.method == "prior"
        self.calibrates_features = calibration.method == "features"
        self.calibration_every = calibration_every(calibration.rounds)
        self.num_rounds: int | None = None  # known once begin_run() / start() runs
        self.round_timeout: float = 3600  # Flower's default, until begin_run() says
        self.grid: Grid | None = None  # kept from configure_train for calibration queries
        if calibration.method != "none":  # fail now if the head has no bias
            classifier_of(reference)
            if self.calibrates_features:  # and without a dense head to calibrate
                self.feature_statistics.layers(reference)
        if proxy_per_round < 0:
            raise ValueError(f"proxy_per_round={proxy_per_round} must be >= 0 (0: all)")
        self.proxy_per_round = proxy_per_round
        self.proxy_batch_size = proxy_batch_size
        self.device = select_device(device)
        self.seed = seed
        self.student_trainer = student_trainer
        self.global_arrays: ArrayRecord | None = None
        self.last_client_models: list[ClientModel] = []
        self.round_teacher: tuple[torch.Tensor, torch.Tensor] | None = None
        # Per-round server-side measurements, read by the ServerApp for metrics.json.
        self.server_metrics: dict[int, dict[str, float]] = {}

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t└──> FedEC: teacher=%s on %d proxy samples (%s per round), "
            "clients start from the %s, calibration=%s, distill=%s, "
            "min_valid_replies=%d",
            self.teacher_rule,
            len(self.proxy_inputs),
            self.proxy_per_round or "all",
            self.client_start,
            self.calibration,
            self.distill_settings,
            self.min_valid_replies,
        )

    # -- Flower hooks -------------------------------------------------------------
    def begin_run(self, num_rounds: int, timeout: float = 3600) -> None:
        """Note the run's length (calibration ``rounds="last"``) and its round timeout,
        which the feature-statistics queries wait as long as a training round does;
        ``start`` calls it, and so does a wrapper's ``start``
        (:class:`~fl_ec.run.wrapper.StrategyWrapper`). A new run reports each
        degraded feature again, once.
        """
        self.num_rounds = num_rounds
        self.round_timeout = timeout
        self.degraded.new_run()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays  # the previous global model, for init / teacher
        self.grid = grid
        if self.client_start == "average" and self.client_start_arrays is not None:
            arrays = self.client_start_arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The served model and the accepted replies' train metrics.

        Bad replies are dropped (logged with node and reason). The metrics are
        ``train_metrics_aggr_fn`` over the accepted replies, as ``FedAvg`` aggregates
        them. ``(None, None)`` when fewer than ``min_valid_replies`` are accepted (none,
        by default): the global model stays.
        """
        replies = list(replies)
        round_replies = self._accept(server_round, replies)
        accepted, stats = round_replies.models, round_replies.stats()
        self.server_metrics[server_round] = stats
        if len(accepted) < self.min_valid_replies:
            if replies or self.fraction_train > 0:  # evaluation-only runs train nothing
                log(
                    WARNING,
                    "round %d: %d of %d replies accepted, fewer than min_valid_replies=%d; "
                    "the global model stays",
                    server_round,
                    len(accepted),
                    len(replies),
                    self.min_valid_replies,
                )
            return None, None
        student, stats = self._compress(server_round, accepted, stats)
        self.server_metrics[server_round] = stats
        served = student.state_dict()
        if not is_finite_state(served):
            # Accepted replies are finite; this guards the arithmetic on them.
            log(
                WARNING,
                "round %d: the aggregate is not finite; the global model stays",
                server_round,
            )
            stats["non-finite-aggregate"] = 1.0
            self.client_start_arrays = None
            return None, None
        self.last_client_models = accepted
        metrics = self._aggregate_metrics(
            server_round, round_replies.contents, self.train_metrics_aggr_fn
        )
        return ArrayRecord(served), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """``evaluate_metrics_aggr_fn`` over the valid evaluation replies, as ``FedAvg``.

        A reply that is an error, repeats a node, or whose MetricRecord fails
        ``FedAvg``'s checks or holds a non-finite metric
        (:func:`~fl_ec.strategies.acceptance.accept_evaluate_replies`) is rejected with a
        warning naming the node and the reason. None without valid replies.
        """
        contents = accept_evaluate_replies(server_round, replies, self.weighted_by_key)
        if not contents:
            return None
        return self._aggregate_metrics(server_round, contents, self.evaluate_metrics_aggr_fn)

    # -- checkpoints (fl_ec.checkpoint.KeepsState) -----------------------------------
    def checkpoint_state(self) -> StrategyState:
        """What the next round needs besides the global model: under
        ``client_start="average"``, the parameter average the clients train from."""
        state = StrategyState(meta={"client-start": self.client_start_arrays is not None})
        if self.client_start_arrays is not None:
            start = self.client_start_arrays.to_torch_state_dict()
            state.tensors.update({f"client-start/{k}": v for k, v in start.items()})
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Continue from :meth:`checkpoint_state`'s ``state``."""
        start = tensors_under(state.tensors, "client-start/")
        self.client_start_arrays = ArrayRecord(start) if state.meta.get("client-start") else None

    # -- the round's steps ----------------------------------------------------------
    def _accept(self, server_round: int, replies: list[Message]) -> AcceptedReplies:
        """The round's replies that pass every check, at most one per node."""
        return accept_train_replies(server_round, replies, self._parse)

    def _parse(self, reply: Message) -> ClientModel:
        """One train reply as a client model, or ``RejectedReplyError`` naming its defect."""
        client_model = parse_train_reply(
            reply,
            self._expect,
            self._build,
            self.weighted_by_key,
            self.arrayrecord_key,
            self.reply_limits,
        )
        self._prepare_client_model(client_model)
        return client_model

    def _aggregate_metrics(
        self,
        server_round: int,
        contents: list[RecordDict],
        aggregate: Callable[[list[RecordDict], str], MetricRecord],
    ) -> MetricRecord:
        """``aggregate(contents, weighted_by_key)``: a ``*_metrics_aggr_fn`` of FedAvg's.

        Metrics that not every reply reports alike are left out first, with a warning
        (:func:`~fl_ec.strategies.fedec_utils.aggregatable_metrics`).
        """
        usable, left_out = aggregatable_metrics(contents, self.weighted_by_key)
        if left_out:
            log(
                WARNING,
                "round %d: metric(s) %s not reported alike by every reply; left out of "
                "the aggregated metrics",
                server_round,
                ", ".join(left_out),
            )
        return aggregate(usable, self.weighted_by_key)

    def _expect(self, claimed: ArchSpec | None, variant: str, node: int) -> Expected:
        """What a reply claiming architecture ``claimed`` must hold.

        With a global spec: the claimed one (else the global one), if no larger
        (:func:`~fl_ec.strategies.replies.spec_bounds`); its arrays may be channel-pruned.
        With ``model_builder``: exactly the builder's arrays, whatever is claimed.
        """
        if self.arch_spec is None:
            return Expected(None, self.reference_bounds, True, self.num_classes)
        if claimed is None or claimed == self.arch_spec:
            return Expected(self.arch_spec, self.reference_bounds, False, self.num_classes)
        return Expected(claimed, spec_bounds(claimed, self.arch_spec), False, self.num_classes)

    def _compress(
        self, server_round: int, accepted: list[ClientModel], stats: dict[str, float]
    ) -> tuple[nn.Module, dict[str, float]]:
        global_spec = self._global_spec()
        groups = group_by_spec(accepted)
        previous = self._previous_global()
        previous_shapes = state_shapes(previous.state_dict())
        same_arch = [
            g
            for g in groups.values()
            if g[0].spec == global_spec and state_shapes(g[0].state) == previous_shapes
        ]
        student = self._student_start(same_arch[0] if same_arch else [], accepted, previous)
        if self.client_start == "average":
            self.client_start_arrays = self._client_start_arrays(
                same_arch[0] if same_arch else [], accepted, student
            )
        members = [m.model for m in accepted]
        generator_seed = self.seed * 10_007 + server_round
        proxy = self.proxy_inputs
        if 0 < self.proxy_per_round < len(proxy):
            chosen = torch.randperm(
                len(proxy), generator=torch.Generator().manual_seed(generator_seed)
            )[: self.proxy_per_round]
            proxy = proxy[chosen]
        class_counts = all_class_counts(accepted)
        rule = self.teacher_rule
        if rule in WEIGHTED_RULES and class_counts is None:
            # Replies from clients that do not report class counts (e.g. a stock
            # quickstart ClientApp): use the plain mean, which needs no counts.
            rule = "mean-logits"
            self.degraded.warn(
                "teacher-rule",
                "round %d: replies from node(s) %s carry no class counts: teacher rule %r "
                "runs as %r in rounds with such replies; %s",
                server_round,
                nodes_without_counts(accepted),
                self.teacher_rule,
                rule,
                ADD_CLASS_COUNTS,
            )
        combine_members = functools.partial(
            teacher_logits,
            members,
            rule=rule,
            batch_size=self.proxy_batch_size,
            device=self.device,
            class_counts=class_counts,
            trim=self.teacher_trim,
        )
        if self._uses_round_teacher():
            teacher = combine_members(proxy)
            stats.update(
                {
                    "teacher-seconds": teacher.seconds,
                    "teacher-samples-per-second": teacher.samples_per_second,
                }
            )
            # Kept for the round so subclasses (FedHCE) can distil more students from it.
            self.round_teacher = (proxy, teacher.logits)
        else:
            # Nothing is distilled (distill-steps=0: FedAvg + prior correction): the proxy
            # pass over every client model would only cost time. The validation pass
            # below still reports the teacher's accuracy.
            stats["teacher-seconds"] = 0.0
            self.round_teacher = None
        if self.validation is not None:
            val_x, val_y = self.validation
            val_teacher = combine_members(val_x)
            stats["teacher-val-accuracy"] = accuracy(val_teacher.logits, val_y)
        # The correction can favour the start over the distilled student: keep it.
        start_state = copy.deepcopy(student.state_dict()) if self.corrects_prior else None
        if self.round_teacher is None:
            # No step is taken; BatchNorm is still re-estimated and the start scored.
            result = distill(
                student, proxy, None, self.validation, self.distill_settings, self.device
            )
        else:
            result = self._distill_student(student, proxy, self.round_teacher[1], generator_seed)
        stats.update(
            {
                "distill-steps": float(result.steps),
                "distill-best-step": float(result.best_step),
                "distill-seconds": result.seconds,
            }
        )
        if self.validation is not None:
            stats["student-start-val-accuracy"] = result.start_accuracy
            stats["student-val-accuracy"] = result.best_accuracy
        if self.corrects_prior:
            stats.update(self._correct_prior(student, start_state, proxy, accepted, server_round))
        # Here, so that FedHCE derives its variants from the calibrated model.
        if self._calibrates(server_round):
            stats.update(self._calibrate_features(server_round, student, accepted))
        log(
            INFO,
            "round %d: teacher %.2fs (%s), distill %d steps %.2fs; val acc teacher %.4f, "
            "average %.4f -> student %.4f",
            server_round,
            stats["teacher-seconds"],
            rule,
            result.steps,
            result.seconds,
            stats.get("teacher-val-accuracy", float("nan")),
            result.start_accuracy,
            result.best_accuracy,
        )
        return student.cpu(), stats

    def _calibrates(self, server_round: int) -> bool:
        """Whether this round's served model is feature-calibrated.

        Outside ``start()`` the last round is unknown: every round is calibrated.
        """
        last = self.num_rounds is None or server_round >= self.num_rounds
        every = self.calibration_every
        return self.calibrates_features and (last or (every > 0 and server_round % every == 0))

    def _calibrate_features(
        self, server_round: int, served: nn.Module, accepted: list[ClientModel]
    ) -> dict[str, float]:
        """Ask the round's clients for feature statistics of ``served``; calibrate it."""
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in served.state_dict().items()})
        nodes = [m.node_id for m in accepted]
        if self.calibration.nodes == "all" and self.grid is not None:
            nodes = sorted(self.grid.get_node_ids())
        parts, stats = self._query_feature_stats(server_round, arrays, {}, served, nodes)
        if not parts:
            return {**stats, "feature-calibration-applied": 0.0}
        stats.update(
            serve_feature_calibrated(
                served,
                self.feature_statistics,
                self.feature_statistics.merge(parts),
                self.calibration,
                self.seed * 10_007 + server_round,
                self._hits,
                server_round,
            )
        )
        return stats

    def _query_feature_stats(
        self,
        server_round: int,
        arrays: ArrayRecord,
        extra_config: dict[str, Any],
        model: nn.Module,
        nodes: list[int],
    ) -> tuple[list[FeatureStats], dict[str, float]]:
        """Send ``arrays`` (``model``'s) to ``nodes`` as a statistics query; valid stats.

        ``extra_config`` goes into the query's config next to the round, the spec and
        which statistics to measure (FedHCE: how to unpack a compressed variant).
        Invalid replies are logged with the node and the reason, and counted.
        """
        if self.grid is None:
            raise RuntimeError("feature calibration needs the grid: run through start()")
        config = ConfigRecord(
            {
                SERVER_ROUND_KEY: server_round,
                STATS_RECORD_KEY: True,
                STATS_LAYERS_KEY: self.calibration.layers,
                STATS_RANK_KEY: self.calibration.rank,
                STATS_COMPONENTS_KEY: self.calibration.components,
            }
        )
        if self.arch_spec is not None:
            config[ARCH_SPEC_KEY] = self.arch_spec.to_json()
        for key, value in extra_config.items():
            config[key] = value
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        start = time.perf_counter()
        replies = list(
            self.grid.send_and_receive(
                self._construct_messages(record, nodes, MessageType.QUERY),
                timeout=self.round_timeout,
            )
        )
        query_seconds = time.perf_counter() - start
        num_classes, dim = self.feature_statistics.dims(model)
        parts, unsupported = accept_stats_replies(
            server_round,
            replies,
            lambda reply: parse_stats_reply(
                reply, num_classes, dim, self.feature_statistics, self.reply_limits
            ),
        )
        if unsupported:
            self.degraded.warn(
                "feature-statistics",
                "round %d: node(s) %s answer no feature-statistics query (%s): feature "
                "calibration runs without them, and a round without any statistics serves "
                "the uncalibrated model; %s",
                server_round,
                sorted(unsupported),
                "; ".join(sorted(set(unsupported.values()))),
                ADD_FEATURE_STATS,
            )
        if not parts:
            # Clients known to lack the query were reported once: no warning per round.
            level = DEBUG if replies and len(unsupported) == len(replies) else WARNING
            log(level, "round %d: no valid feature statistics; not calibrated", server_round)
        stats = {
            "calibration-query-seconds": query_seconds,
            "calibration-valid-replies": float(len(parts)),
            "calibration-rejected-replies": float(len(replies) - len(parts)),
        }
        return parts, stats

    def _distill_student(
        self,
        student: nn.Module,
        proxy: torch.Tensor,
        teacher: torch.Tensor,
        seed: int,
    ) -> DistillResult:
        """Compress the teacher into ``student`` (in place): Adam KD, or ``student_trainer``."""
        if self.student_trainer is None:
            return distill(
                student,
                proxy,
                teacher,
                self.validation,
                self.distill_settings,
                self.device,
                seed,
            )
        # An external trainer (e.g. layer-parallel) has no early stopping of its own:
        # keep whichever of start and result scores better on validation.
        start_time = time.perf_counter()
        before = copy.deepcopy(student.state_dict())
        start = self._score(student)
        self.student_trainer(student, proxy, teacher)
        end = self._score(student)
        if end < start:
            student.load_state_dict(before)
        return DistillResult(
            start, max(start, end), 1, int(end >= start), time.perf_counter() - start_time
        )

    def _correct_prior(
        self,
        student: nn.Module,
        start_state: dict[str, torch.Tensor] | None,
        proxy: torch.Tensor,
        accepted: list[ClientModel],
        server_round: int,
    ) -> dict[str, float]:
        """Match the served model's proxy predictions to the federation's label prior.

        The corrected student and the corrected start of distillation compete on
        validation (:func:`~fl_ec.strategies.fedec_calibration.serve_prior_corrected`).
        """
        counts = all_class_counts(accepted)
        if counts is None:
            self.degraded.warn(
                "prior-correction",
                "round %d: replies from node(s) %s carry no class counts: calibration "
                "'prior' is skipped in rounds with such replies; %s",
                server_round,
                nodes_without_counts(accepted),
                ADD_CLASS_COUNTS,
            )
            return {"prior-correction-applied": 0.0}
        start = None
        if self.validation is not None and start_state is not None:  # only scored on it
            start = self._build(self._global_spec(), start_state)
        return serve_prior_corrected(
            student,
            start,
            proxy,
            target_prior(counts),
            self._hits,
            self.proxy_batch_size,
            self.device,
            server_round,
        )

    def _hits(self, model: nn.Module) -> torch.Tensor | None:
        """Per-sample correctness on validation (None without validation data)."""
        if self.validation is None:
            return None
        inputs, labels = self.validation
        return model_hits(model, inputs, labels, self.proxy_batch_size, self.device)

    def _score(self, model: nn.Module) -> float:
        if self.validation is None:
            return float("nan")
        return model_accuracy(model, self.validation[0], self.validation[1], device=self.device)

    # -- hooks for subclasses ----------------------------------------------------------
    def _uses_round_teacher(self) -> bool:
        """Whether anything trains on this round's proxy teacher (else the pass is skipped)."""
        return self.distill_settings.steps > 0 or self.student_trainer is not None

    def _prepare_client_model(self, client_model: ClientModel) -> None:
        """Check / adapt an accepted reply's model; raise ``ValueError`` to reject it."""

    def _client_start_arrays(
        self, same_arch: list[ClientModel], accepted: list[ClientModel], start: nn.Module
    ) -> ArrayRecord | None:
        """What next round's clients train from under ``client_start="average"``.

        ``start`` is this round's student before distillation. Without a
        same-architecture group there is no average: clients get the student (None).
        """
        return ArrayRecord(start.state_dict()) if same_arch else None

    def _student_start(
        self, same_arch: list[ClientModel], accepted: list[ClientModel], previous: nn.Module
    ) -> nn.Module:
        """The model distillation starts from (FedDF): the replies that share the global
        architecture averaged by ``start_rule`` (FedAvg's weighted mean by default),
        else ``previous``."""
        if not same_arch:
            return previous
        # What the clients trained from: their updates are measured from it.
        sent = previous.state_dict()
        if self.client_start == "average" and self.client_start_arrays is not None:
            sent = self.client_start_arrays.to_torch_state_dict()
        state = self.start_rule.combine(
            [m.state for m in same_arch], [m.num_examples for m in same_arch], sent
        )
        return self._build(self._global_spec(), state)

    # -- EC-DNN's inference-time ensemble -------------------------------------------
    def ensemble_members(self) -> list[nn.Module]:
        """The last round's client models (EC-DNN's global ensemble), in eval mode."""
        return [m.model.eval() for m in self.last_client_models]

    def save_artifacts(self, recorder: RunRecorder, test: TensorData) -> None:
        """EC-DNN's inference-time model: the last round's client models, averaging logits.

        Each member goes to ``ensemble/member-<i>`` with its spec; the ensemble's test
        accuracy and size to the run's summary (``ensemble-test-accuracy``,
        ``ensemble-members``). Nothing without a completed round.
        """
        members = self.ensemble_members()
        if not members:
            return
        outputs = teacher_logits(
            members, test.normalize(test.images), "mean-logits", device=self.device
        )
        test_accuracy = accuracy(outputs.logits, test.labels)
        recorder.extra_summary["ensemble-test-accuracy"] = test_accuracy
        recorder.extra_summary["ensemble-members"] = len(members)
        for index, member in enumerate(self.last_client_models):
            recorder.write_model(member.state, name=f"ensemble/member-{index}", spec=member.spec)
        log(
            INFO,
            "[fl-ec] EC-DNN global ensemble of %d client models: test acc %.2f%%",
            len(members),
            100 * test_accuracy,
        )

    # -- helpers ----------------------------------------------------------------------
    def _global_spec(self) -> ArchSpec | None:
        return self.arch_spec

    def _build(self, spec: ArchSpec | None, state: dict[str, torch.Tensor]) -> nn.Module:
        """A model from arrays: by spec when there is one, else the user's builder."""
        if spec is not None:
            return build_from_state_dict(spec, state)
        model = self.model_builder()  # type: ignore[misc]
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # keys/shapes that do not fit the builder's model
            raise ModelSpecError(f"arrays do not fit model_builder's model: {err}") from None
        return model

    def _previous_global(self) -> nn.Module:
        if self.global_arrays is None:
            raise RuntimeError("FedEC.aggregate_train called before configure_train")
        return self._build(self._global_spec(), self.global_arrays.to_torch_state_dict())


def _num_outputs(model: nn.Module) -> int | None:
    """The number of classes: the last linear layer's outputs (None without one)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
