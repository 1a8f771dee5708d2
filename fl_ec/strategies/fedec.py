"""FedEC: aggregate by ensembling client outputs on a proxy set, compress by distillation.

EC-DNN's rule (Sun et al. 2017) on a Flower server, in the spirit of FedDF (Lin et al.
2020): each round the clients' models form an ensemble *teacher* on the server's
unlabeled proxy set, and the teacher is compressed back into one model of the local
size by distillation, starting from the parameter average. The round's steps live in
:mod:`~fl_ec.strategies.steps` (and the algorithms in :mod:`fl_ec.ensemble`,
:mod:`fl_ec.distill`, :mod:`fl_ec.calibration`); this class is the Flower glue.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_ec.calibration import CalibrationSettings, classifier_of
from fl_ec.checkpoint import StrategyState, tensors_under
from fl_ec.data.batches import input_tensor, labelled_tensors
from fl_ec.data.tensor_data import TensorData
from fl_ec.distill import DistillSettings
from fl_ec.models.layout import probe_channels_last
from fl_ec.models.spec import ArchSpec
from fl_ec.results import RunRecorder
from fl_ec.robust import StartRule, WeightedMean
from fl_ec.run.allocator import fix_heap_thresholds
from fl_ec.run.loop import RunsRoundsOnStart
from fl_ec.run.reporting import RoundMetrics
from fl_ec.strategies.acceptance import accept_evaluate_replies, accept_train_replies
from fl_ec.strategies.artifacts import save_ensemble
from fl_ec.strategies.degraded import DegradedFeatures
from fl_ec.strategies.fedec_calibration import prior_correction
from fl_ec.strategies.fedec_utils import ClientModel, aggregate_alike, is_finite_state, members_of
from fl_ec.strategies.global_model import GlobalModel, ModelBuilder
from fl_ec.strategies.replies import Expected, ReplyLimits, parse_train_reply
from fl_ec.strategies.serving import FeatureCalibrator, RoundServing, ServePlan
from fl_ec.strategies.settings import FedECSettings
from fl_ec.strategies.stats_query import query_messages, read_stats_replies
from fl_ec.strategies.steps import (
    RoundOutcome,
    StudentTrainer,
    TeacherSettings,
    ValidationScorer,
    distill_metrics,
    distill_student,
    log_round,
    proxy_for_round,
    round_seed,
    run_teacher,
    teacher_rule_for,
)
from fl_ec.strategies.student_start import AverageStart, StudentStart
from fl_ec.training import select_device


class FedEC(RunsRoundsOnStart, FedAvg):
    """Ensemble-Compression federated averaging: a drop-in replacement for ``FedAvg``.

    Takes every ``FedAvg`` argument and uses it as ``FedAvg`` does. Given the same
    replies, FedEC with ``distill.steps=0``, no calibration and a model without
    BatchNorm returns ``FedAvg``'s arrays bit for bit. Replies are checked one by one
    before anything is built from them; a bad one is rejected alone, logged with its
    node and reason. ``docs/fedec.md`` lists every difference from ``FedAvg``.

    A round: ``configure_train``; ``aggregate_train`` checks the replies and runs
    :meth:`aggregate_models` (start, teacher, distillation, prior correction); then
    :meth:`serve`, which may query the clients between training and evaluation
    (``configure_query`` / ``aggregate_query``: :func:`fl_ec.run.loop.run_rounds`).
    It reports ``server_metrics`` per round (:class:`~fl_ec.run.reporting.RunReporter`).

    Parameters
    ----------
    proxy_data : Tensor | Dataset | DataLoader
        Unlabeled server-side inputs, normalised as the model expects, neither the
        clients' data nor the test set (:func:`fl_ec.data.hold_out`); labels ignored.
    arch_spec, model_builder : ArchSpec | str | None, Callable[[], nn.Module] | None
        The global architecture: a spec (object or JSON) or a builder of the user's model.
    validation_data : tuple[Tensor, Tensor] | Dataset | DataLoader | None
        Labelled server-side data for early stopping, reverting harmful calibrations
        and per-round validation metrics.
    distill : DistillSettings
        Steps, batch size, Adam lr, temperature, evaluation interval and patience.
    teacher_rule, teacher_trim, client_start, proxy_per_round, proxy_batch_size,
    min_valid_replies
        :class:`~fl_ec.strategies.settings.FedECSettings`: the teacher's rule
        (``mean-logits``, ``label-aware``, ``gated``) and how many clients it trims per
        sample; what the clients train next (``average``: the parameter average, while
        the student is served; ``student``: FedDF's); a seeded proxy subset per round
        (0: all); the teacher's batch size; the fewest accepted replies a round
        aggregates.
    calibration : str | CalibrationSettings | None
        A :meth:`~fl_ec.calibration.CalibrationSettings.preset` name (``none``,
        ``prior``, ``classifier``, ``dense``, ``dense-mixture``) or the settings.
    device, seed : str (default: "auto"), int
        Where the server computes; the seed of every per-round draw.
    student_trainer : Callable[[nn.Module, Tensor, Tensor], None] | None
        Replaces the Adam distillation (e.g. the layer-parallel trainer with a KL loss).
    reply_limits : ReplyLimits | None
        What one reply may claim (:class:`~fl_ec.strategies.replies.ReplyLimits`).
    start_rule : StartRule | None (default: ``WeightedMean()``, FedAvg's)
        How same-architecture replies are averaged (:mod:`fl_ec.robust`).
    """

    def __init__(
        self,
        *,
        proxy_data: torch.Tensor | Dataset | DataLoader,
        arch_spec: ArchSpec | str | None = None,
        model_builder: ModelBuilder | None = None,
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
        student_trainer: StudentTrainer | None = None,
        min_valid_replies: int = 1,
        reply_limits: ReplyLimits | None = None,
        start_rule: StartRule | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        fix_heap_thresholds()  # the round's peak memory, not glibc's history, decides RSS
        self.settings = FedECSettings(
            teacher_rule, teacher_trim, client_start, proxy_per_round, proxy_batch_size,
            min_valid_replies,
        )
        self.model = GlobalModel(arch_spec, model_builder)
        self.proxy_inputs = input_tensor(proxy_data, name="proxy_data")
        self.validation = labelled_tensors(validation_data) if validation_data is not None else None
        if self.model.spec is None and len(self.proxy_inputs):
            # A user's model may .view() a conv output, which fails channels-last.
            probe_channels_last(self.model.reference, self.proxy_inputs[:8])
        self.distill_settings = distill or DistillSettings()
        if not isinstance(calibration, CalibrationSettings):
            calibration = CalibrationSettings.preset(calibration or "none")
        self.calibration = calibration
        self.device = select_device(device)
        self.scorer = ValidationScorer(self.validation, proxy_batch_size, self.device)
        self.calibrator = FeatureCalibrator(calibration, seed, self.scorer.hits)
        if calibration.method != "none":  # fail now if the head has no bias
            classifier_of(self.model.reference)
            if calibration.method == "features":  # or without a dense head to calibrate
                self.calibrator.statistics.layers(self.model.reference)
        self.start_rule = start_rule or WeightedMean()
        self.student_start: StudentStart = AverageStart(self.model, self.start_rule)
        self.reply_limits = reply_limits or ReplyLimits()
        self.seed = seed
        self.student_trainer = student_trainer
        # Whether anything trains on the round's teacher (else its proxy pass is skipped).
        self.trains_on_teacher = self.distill_settings.steps > 0 or student_trainer is not None
        self.degraded = DegradedFeatures()
        self.num_rounds: int | None = None  # known once begin_run() runs
        self.client_start_arrays: ArrayRecord | None = None  # "average": what clients train
        self.global_arrays: ArrayRecord | None = None  # the global model of this round
        self.last_client_models: list[ClientModel] = []
        self.server_metrics: dict[int, RoundMetrics] = {}  # read by the ServerApp
        self.serving = RoundServing()  # the round's work after distillation

    def summary(self) -> None:
        super().summary()
        s = self.settings
        log(INFO, "\t└──> FedEC: teacher=%s (trim %g) on %d proxy samples (%s per round), clients "
            "start from the %s, calibration=%s, distill=%s, min_valid_replies=%d", s.teacher_rule,
            s.teacher_trim, len(self.proxy_inputs), s.proxy_per_round or "all", s.client_start,
            self.calibration, self.distill_settings, s.min_valid_replies)

    # -- Flower hooks -------------------------------------------------------------
    def begin_run(self, num_rounds: int, timeout: float = 3600) -> None:
        """Note the run's length (calibration ``rounds="last"``); a new run reports each
        degraded feature again, once. ``start`` and the wrappers call it."""
        self.num_rounds = num_rounds
        self.degraded.new_run()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.serving.finish(self.degraded)  # a round loop without a query phase
        self.global_arrays = arrays  # the previous global model: the student's fallback
        if self.settings.trains_average and self.client_start_arrays is not None:
            arrays = self.client_start_arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The served model and the accepted replies' train metrics.

        ``(None, None)`` when fewer than ``min_valid_replies`` are accepted or the
        aggregate is not finite: the global model stays.
        """
        replies = list(replies)
        accepted = accept_train_replies(server_round, replies, self.read_reply)
        metrics = self.server_metrics[server_round] = accepted.stats()
        # Evaluation-only runs (fraction_train=0) train nothing: no warning for them.
        if accepted.below(self.settings.min_valid_replies, bool(replies or self.fraction_train)):
            return None, None
        outcome = self.aggregate_models(server_round, accepted.models, metrics)
        served = outcome.student.state_dict()
        if not is_finite_state(served):  # accepted replies are finite: guards the arithmetic
            log(WARNING, "round %d: the aggregate is not finite; the global model stays",
                server_round)
            metrics["non-finite-aggregate"] = 1.0
            self.client_start_arrays = None
            return None, None
        self.last_client_models = accepted.models
        arrays = ArrayRecord(served)
        train_metrics = aggregate_alike(
            server_round, accepted.contents, self.train_metrics_aggr_fn, self.weighted_by_key
        )
        self.serving.begin(outcome, self.serve(outcome))  # runs up to its first query
        return arrays, train_metrics

    def configure_query(
        self, server_round: int, arrays: ArrayRecord, grid: Grid
    ) -> Iterable[Message]:
        """The messages of the round's next statistics query (none: nothing to ask)."""
        pending = self.serving.next_query(grid)
        if pending is None:
            return []
        keys = (self.arrayrecord_key, self.configrecord_key)
        return query_messages(*pending, self.calibration, self.model.spec, keys)

    def aggregate_query(
        self, server_round: int, replies: Iterable[Message]
    ) -> ArrayRecord | None:
        """Hand the query's valid statistics to the round; the served model once done."""
        query, outcome = self.serving.query, self.serving.outcome
        if query is None or outcome is None:
            return None
        statistics = self.calibrator.statistics
        self.serving.advance(
            read_stats_replies(query, list(replies), statistics, self.reply_limits, self.degraded)
        )
        served = outcome.student.state_dict()
        return ArrayRecord(served) if self.serving.done and is_finite_state(served) else None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """``evaluate_metrics_aggr_fn`` over the valid evaluation replies, as ``FedAvg``."""
        contents = accept_evaluate_replies(server_round, replies, self.weighted_by_key)
        if not contents:
            return None
        return aggregate_alike(
            server_round, contents, self.evaluate_metrics_aggr_fn, self.weighted_by_key
        )

    # -- the round ------------------------------------------------------------------
    def read_reply(self, reply: Message) -> ClientModel:
        """One train reply as a client model, or ``RejectedReplyError`` naming its defect."""
        return parse_train_reply(
            reply, self.expected_reply, self.build_client_model, self.weighted_by_key,
            self.arrayrecord_key, self.reply_limits,
        )

    def build_client_model(
        self, spec: ArchSpec | None, state: dict[str, torch.Tensor]
    ) -> nn.Module:
        """A reply's model, sharing the reply's tensors: client models are only read."""
        return self.model.build(spec, state, share=True)

    def expected_reply(self, claimed: ArchSpec | None, variant: str, node: int) -> Expected:
        """What node ``node``'s reply, claiming architecture ``claimed``, must hold."""
        return self.model.expected(claimed)

    def aggregate_models(
        self, server_round: int, accepted: list[ClientModel], metrics: RoundMetrics
    ) -> RoundOutcome:
        """The round's steps from the accepted client models to the served student."""
        if self.global_arrays is None:
            raise RuntimeError("FedEC.aggregate_train called before configure_train")
        previous = self.model.from_state(self.global_arrays.to_torch_state_dict())
        sent = previous.state_dict()  # what the clients trained from
        if self.settings.trains_average and self.client_start_arrays is not None:
            sent = self.client_start_arrays.to_torch_state_dict()
        start = self.student_start(accepted, previous, sent)
        if self.settings.trains_average:
            self.client_start_arrays = (
                ArrayRecord(start.client_start) if start.client_start is not None else None
            )
        seed = round_seed(self.seed, server_round)
        proxy = proxy_for_round(self.proxy_inputs, self.settings.proxy_per_round, seed)
        rule = teacher_rule_for(self.settings.teacher_rule, accepted, self.degraded, server_round)
        teacher, teacher_metrics = run_teacher(
            accepted, proxy, self.validation,
            TeacherSettings(rule, self.settings.teacher_trim, self.settings.proxy_batch_size,
                            self.device),
            needed=self.trains_on_teacher,
        )
        metrics.update(teacher_metrics)
        student = start.student
        corrects_prior = self.calibration.method == "prior"
        # The correction can favour the start over the distilled student: keep it.
        start_state = copy.deepcopy(student.state_dict()) if corrects_prior else None
        result = distill_student(
            student, proxy, teacher, self.validation, self.distill_settings, self.device,
            seed, self.student_trainer, self.scorer.accuracy,
        )
        metrics.update(distill_metrics(result, self.validation is not None))
        if start_state is not None:  # the start competes on validation only
            build_start = lambda: self.model.from_state(start_state)  # noqa: E731
            metrics |= prior_correction(
                student, build_start if self.validation is not None else None, proxy,
                accepted, self.scorer.hits, self.settings.proxy_batch_size, self.device,
                server_round, self.degraded,
            )
        log_round(server_round, rule, result, metrics)
        client_start = start.client_start if self.settings.trains_average else None
        return RoundOutcome(server_round, accepted, student, client_start, teacher, metrics)

    def serve(self, outcome: RoundOutcome) -> ServePlan:
        """The round's work once the student is distilled: its feature calibration.

        A generator: it yields each statistics query the round loop is to send and
        receives the query's valid statistics. Subclasses extend it (FedHCE: the
        variants, from the calibrated student): ``yield from super().serve(outcome)``.
        """
        if self.calibrator.calibrates(outcome.server_round, self.num_rounds):
            metrics = yield from self.calibrator.calibrate(outcome.student, outcome)
            outcome.metrics.update(metrics)

    # -- checkpoints (fl_ec.checkpoint.KeepsState) -----------------------------------
    def checkpoint_state(self) -> StrategyState:
        """Under ``client_start="average"``, the parameter average the clients train from."""
        state = StrategyState(meta={"client-start": self.client_start_arrays is not None})
        if self.client_start_arrays is not None:
            start = self.client_start_arrays.to_torch_state_dict()
            state.tensors.update({f"client-start/{k}": v for k, v in start.items()})
        return state

    def restore_state(self, state: StrategyState) -> None:
        """Continue from :meth:`checkpoint_state`'s ``state``."""
        start = tensors_under(state.tensors, "client-start/")
        self.client_start_arrays = ArrayRecord(start) if state.meta.get("client-start") else None

    # -- EC-DNN's inference-time ensemble -------------------------------------------
    def ensemble_members(self) -> list[nn.Module]:
        """The last round's client models (EC-DNN's global ensemble), in eval mode."""
        return members_of(self.last_client_models)

    def save_artifacts(self, recorder: RunRecorder, test: TensorData) -> None:
        """EC-DNN's ensemble of the last round's client models (:func:`save_ensemble`)."""
        save_ensemble(recorder, test, self.last_client_models, self.device)
