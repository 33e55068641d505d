using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;
using Xunit.Abstractions;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// The TrainingCoordinator alone, driven message by message: test probes play the node agents, device
/// workers, pipeline stages and the shared expert shard (see <see cref="CoordinatorRun"/>: two nodes with
/// one device each, DP 2 x PP 1, one shared shard on node A so every step has a norms phase).
/// Assertions are on what the probes receive and on the run's result. Things that must happen are awaited
/// with long timeouts; things that must not happen are checked with short quiet windows, which a correct
/// coordinator passes however slow the machine is.
/// </summary>
public sealed class CoordinatorTests(ITestOutputHelper output) : CoordinatorTestKit(output)
{
    private static readonly TimeSpan Wait = CoordinatorRun.Wait;
    private static readonly TimeSpan Quiet = CoordinatorRun.Quiet;

    // ---- 1. a clean step -----------------------------------------------------------------------

    [Fact]
    public void A_clean_step_computes_then_asks_the_shard_for_its_norm_then_updates_everyone_and_the_next_step_follows()
    {
        var run = NewRun();
        var plan = run.Start();
        Assert.Equal(2, plan.Dp);
        Assert.Equal(1, plan.Pp);

        var f0 = run.F(0);
        Assert.Equal(new Fence(1, 0, 0), f0);
        run.ExpectRunStep(f0);

        // The shard is asked for its norm only when both replicas have computed.
        run.Compute(f0, run.A, lossSum: 2.0, gradSumSq: 3.0);
        run.Shard.ExpectNoMsg(Quiet);
        // Replica 1's dense gradients equal replica 0's after the all-reduce: its GradSumSq must not be counted.
        run.Compute(f0, run.B, lossSum: 2.0, gradSumSq: 100.0);
        run.ExpectNormQuery(f0);
        // No update before the norm is in: the clip coefficient needs it.
        run.ExpectQuiet(run.A.Stage, run.B.Stage);
        run.Norm(f0, sumSq: 1.0);

        var u = run.ExpectUpdate(f0);
        var t = run.Config.Train;
        Assert.Equal(LrSchedule.At(0, t.Steps, t.Lr, t.MinLr, t.WarmupSteps), u.Lr);
        Assert.Equal(GradClip.Coefficient(3.0 + 1.0, t.GradClip), u.ClipScale);
        Assert.Equal(0, u.ComputeAttempt);
        Assert.False(u.Checksum);
        // Loads are the sum over both replicas, per MoE layer and expert.
        var countsA = run.Counts(run.A.Rank);
        var countsB = run.Counts(run.B.Rank);
        for (int l = 0; l < plan.ExpertOwner.Length; l++)
            Assert.Equal(countsA[l].Zip(countsB[l], (a, b) => a + b), u.LayerLoads[l]);

        // The step commits only when every stage and the shard have applied it.
        run.Applied(f0, run.A);
        run.Applied(f0, run.B);
        run.ExpectQuiet(run.A.Stage, run.B.Stage);
        run.ShardApplied(f0);
        run.ExpectRunStep(run.F(1));
        run.ComputeAll(run.F(1));
        run.NormsAndUpdate(run.F(1));

        // The last step is followed by an evaluation, the final summaries and the agents' shutdown.
        run.CompleteEval(2, lossSum: 1.0);
        Assert.All(run.CompleteFinish(), r => Assert.Equal("training finished", r));

        var result = run.AwaitResult();
        Assert.Equal([0L, 1L], result.Steps.Select(s => s.Step));
        Assert.Equal(4.0 / t.MicroBatchesPerStep, result.Steps[0].Loss);
        Assert.Equal(2.0, result.Steps[0].GradNorm, 12);   // sqrt(3 + 1): replica 0's stage plus the shard
        Assert.Equal(u.Lr, result.Steps[0].Lr);
        Assert.Equal([(2L, 2.0 / t.EvalBatches)], result.Validation);
        Assert.Equal(3, result.FinalParameters.Count);      // two stages and the shard answered
        Assert.Equal(0, result.RedoneAttempts);
        var record = Assert.Single(result.Plans);
        Assert.Equal((1, 0L, 2, 1), (record.Epoch, record.AtStep, record.Dp, record.Pp));
        // Nobody was asked to abort anything.
        run.ExpectQuiet(run.A.Worker, run.B.Worker);
    }

    // ---- 2. abort and redo in each phase -------------------------------------------------------

    [Theory]
    [InlineData(FailureKind.Injected)]
    [InlineData(FailureKind.Error)]
    public void A_worker_failure_while_computing_aborts_the_attempt_everywhere_and_redoes_the_step(FailureKind kind)
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        // A finished its share; B fails. A's result belongs to the aborted attempt and must be thrown away.
        run.Compute(run.F(0), run.A);
        run.Coordinator.Tell(new WorkerFailed(run.F(0), run.B.Rank, kind, "boom in backward"), run.B.Stage.Ref);

        ExpectAbortOnEveryWorker(run, run.F(0, 0), "boom in backward");
        run.ExpectRunStep(run.F(0, 1));
        run.Compute(run.F(0, 1), run.B);
        run.Shard.ExpectNoMsg(Quiet);   // A has not computed attempt 1 yet: attempt 0's result does not count
        run.Compute(run.F(0, 1), run.A);
        var u = run.NormsAndUpdate(run.F(0, 1));
        Assert.Equal(1, u.ComputeAttempt);

        var result = run.CompleteRun(1);
        Assert.Equal([0L, 1L], result.Steps.Select(s => s.Step));
        Assert.Equal(1, result.RedoneAttempts);
    }

    [Fact]
    public void A_shard_failure_while_the_norms_are_gathered_aborts_and_redoes_the_step_and_a_late_norm_of_the_old_attempt_does_not_count()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.ComputeAll(run.F(0));
        run.ExpectNormQuery(run.F(0));
        run.Coordinator.Tell(new WorkerFailed(run.F(0), run.A.Rank, FailureKind.Error, "shard lost its gradients"), run.Shard.Ref);

        ExpectAbortOnEveryWorker(run, run.F(0, 0), "shard lost its gradients");
        run.ExpectRunStep(run.F(0, 1));
        run.ComputeAll(run.F(0, 1));
        run.ExpectNormQuery(run.F(0, 1));
        run.Norm(run.F(0, 0));                      // late, of the aborted attempt
        run.ExpectQuiet(run.A.Stage, run.B.Stage);  // so no update yet
        run.Norm(run.F(0, 1));
        var u = run.ExpectUpdate(run.F(0, 1));
        Assert.Equal(1, u.ComputeAttempt);
        run.ApplyAll(run.F(0, 1));

        var result = run.CompleteRun(1);
        Assert.Equal(2, result.Steps.Count);
        Assert.Equal(1, result.RedoneAttempts);
    }

    [Fact]
    public void A_worker_failure_during_the_update_rolls_the_same_update_forward_as_the_next_attempt_instead_of_recomputing()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.ComputeAll(run.F(0));
        var u0 = run.NormsThenExpectUpdate(run.F(0));

        // A applied step 0 already, then B failed: recomputing would apply the step twice on A.
        run.Applied(run.F(0), run.A);
        run.Coordinator.Tell(new WorkerFailed(run.F(0), run.B.Rank, FailureKind.Injected, "fault in update"), run.B.Stage.Ref);

        ExpectAbortOnEveryWorker(run, run.F(0, 0), "fault in update");
        // ExpectUpdate takes an ApplyUpdate from every stage: a RunStep (a recompute) would fail it.
        var u1 = run.ExpectUpdate(run.F(0, 1));
        Assert.Equal(0, u1.ComputeAttempt);                  // the gradients of attempt 0 are the ones applied
        CoordinatorRun.AssertSameUpdate(u0, u1, sameFence: false);

        // Answers to the interrupted update do not count toward the rolled-forward one.
        run.ShardApplied(run.F(0, 0));
        run.Applied(run.F(0, 0), run.B);
        run.Applied(run.F(0, 1), run.A, already: true);
        run.ShardApplied(run.F(0, 1));
        run.ExpectQuiet(run.A.Stage, run.B.Stage);
        run.Applied(run.F(0, 1), run.B);

        var result = run.CompleteRun(1);   // starts by expecting RunStep e1/s1/a0
        Assert.Equal([0L, 1L], result.Steps.Select(s => s.Step));
        Assert.Equal(1, result.RedoneAttempts);
    }

    [Fact]
    public void A_RequestAbort_from_outside_while_computing_aborts_and_redoes_the_step()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.Coordinator.Tell(new RequestAbort("operator wants a redo"), TestActor);

        ExpectAbortOnEveryWorker(run, run.F(0, 0), "operator wants a redo");
        run.ExpectRunStep(run.F(0, 1));
        run.ComputeAll(run.F(0, 1));
        run.NormsAndUpdate(run.F(0, 1));

        var result = run.CompleteRun(1);
        Assert.Equal(2, result.Steps.Count);
        Assert.Equal(1, result.RedoneAttempts);
    }

    [Fact]
    public void A_RequestAbort_during_the_update_rolls_the_update_forward()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.ComputeAll(run.F(0));
        var u0 = run.NormsThenExpectUpdate(run.F(0));
        run.Coordinator.Tell(new RequestAbort("operator wants a redo"), TestActor);

        ExpectAbortOnEveryWorker(run, run.F(0, 0), "operator wants a redo");
        var u1 = run.ExpectUpdate(run.F(0, 1));
        Assert.Equal(0, u1.ComputeAttempt);
        CoordinatorRun.AssertSameUpdate(u0, u1, sameFence: false);
    }

    [Fact]
    public void A_step_that_keeps_failing_stops_the_run_after_MaxAttemptsPerStep_attempts_with_the_last_reason()
    {
        var run = NewRun();
        run.Start();
        for (int attempt = 0; attempt < TrainingCoordinator.MaxAttemptsPerStep; attempt++)
        {
            run.ExpectRunStep(run.F(0, attempt));
            run.Coordinator.Tell(new WorkerFailed(run.F(0, attempt), run.A.Rank, FailureKind.Injected, $"fault {attempt}"), run.A.Stage.Ref);
            ExpectAbortOnEveryWorker(run, run.F(0, attempt), $"fault {attempt}");
        }

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.Error, ex.Kind);
        Assert.Contains($"failed {TrainingCoordinator.MaxAttemptsPerStep} attempts", ex.Message);
        Assert.Contains($"fault {TrainingCoordinator.MaxAttemptsPerStep - 1}", ex.Message);
        Assert.All(run.ExpectShutdownOfAgents(), r => Assert.Equal(ex.Message, r));
        // No attempt beyond the limit.
        run.ExpectQuiet(run.A.Stage, run.B.Stage);
    }

    // ---- 3. divergence stops the run at once ---------------------------------------------------

    [Theory]
    [InlineData("compute")]
    [InlineData("norms")]
    [InlineData("update")]
    public void A_diverged_worker_stops_the_run_at_once_without_a_redo_and_the_nodes_are_shut_down(string phase)
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        var reporter = run.A.Stage;
        if (phase is "norms" or "update")
        {
            run.ComputeAll(run.F(0));
            run.ExpectNormQuery(run.F(0));
            reporter = run.Shard;
        }
        if (phase == "update")
        {
            run.Norm(run.F(0));
            run.ExpectUpdate(run.F(0));
            reporter = run.B.Stage;
        }
        run.Coordinator.Tell(new WorkerFailed(run.F(0), run.A.Rank, FailureKind.Diverged, "gradient is NaN"), reporter.Ref);

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.Diverged, ex.Kind);
        Assert.Contains("gradient is NaN", ex.Message);
        Assert.All(run.ExpectShutdownOfAgents(), r => Assert.Contains("gradient is NaN", r));
        // Redoing would give the same numbers: no new attempt, no rolled-forward update.
        run.ExpectQuiet(run.A.Stage, run.B.Stage, run.Shard);
    }

    [Fact]
    public void A_NaN_loss_in_a_StepComputed_stops_the_run_as_diverged_without_a_redo_or_an_update()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.Compute(run.F(0), run.A, lossSum: double.NaN);
        run.Compute(run.F(0), run.B);
        AnswerNormQueriesUntilTheRunEnds(run);

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.Diverged, ex.Kind);
        Assert.Contains("loss", ex.Message);
        Assert.Equal(2, run.ExpectShutdownOfAgents().Count);
        run.ExpectQuiet(run.A.Stage, run.B.Stage);   // neither ApplyUpdate nor a new RunStep
    }

    [Fact]
    public void A_NaN_expert_norm_stops_the_run_as_diverged_naming_the_gradient_norm()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.ComputeAll(run.F(0));
        run.ExpectNormQuery(run.F(0));
        run.Norm(run.F(0), sumSq: double.NaN);

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.Diverged, ex.Kind);
        Assert.Contains("gradient norm", ex.Message);
        Assert.Equal(2, run.ExpectShutdownOfAgents().Count);
        run.ExpectQuiet(run.A.Stage, run.B.Stage);
    }

    // ---- 4. timeouts ---------------------------------------------------------------------------

    [Fact]
    public void An_evaluation_that_does_not_answer_within_the_eval_timeout_fails_the_run_naming_the_evaluation()
    {
        var run = NewRun(("train.steps", "1"), ("cluster.eval-timeout", "1"));
        run.Start();
        run.CompleteAttempt(run.F(0));
        foreach (var n in run.Ranked) n.Stage.ExpectMsg<RunEval>(Wait);   // and nobody answers

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.Timeout, ex.Kind);
        Assert.Contains("evaluation after step", ex.Message);
        Assert.Equal(2, run.ExpectShutdownOfAgents().Count);
    }

    [Fact]
    public void Missing_parameter_summaries_within_the_finish_timeout_fail_the_run_naming_the_summaries()
    {
        var run = NewRun(("train.steps", "1"), ("cluster.finish-timeout", "1"));
        run.Start();
        run.CompleteAttempt(run.F(0));
        run.CompleteEval(1);
        var owners = run.ExpectReportParameters();
        Assert.Equal(3, owners.Count);
        // B's stage never answers.
        run.Summary(run.A.Stage, run.A.Rank);
        run.Summary(run.Shard, run.A.Rank);

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.Timeout, ex.Kind);
        Assert.Contains("final parameter summaries", ex.Message);
        Assert.Contains($"of {owners.Count}", ex.Message);
        Assert.Equal(2, run.ExpectShutdownOfAgents().Count);
    }

    [Fact]
    public void A_step_with_no_StepComputed_within_the_step_timeout_is_aborted_and_redone_not_left_hanging()
    {
        var run = NewRun(("cluster.step-timeout", "1"));
        run.Start();
        run.ExpectRunStep(run.F(0));   // and nobody answers

        ExpectAbortOnEveryWorker(run, run.F(0, 0), "compute phase did not complete");
        run.ExpectRunStep(run.F(0, 1));
        // A timeout is retried like any transient fault; the run goes on (a later attempt may time out too,
        // which is why nothing here depends on how fast the redo is answered).
        Assert.False(run.Result.IsFaulted);
    }

    // ---- 5. stale and duplicate messages -------------------------------------------------------

    [Fact]
    public void StepComputed_of_another_epoch_an_older_attempt_or_another_step_does_not_count()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        // Move to attempt 1, so there is an older attempt whose messages can still be in flight.
        run.Coordinator.Tell(new RequestAbort("make attempt 0 stale"), TestActor);
        ExpectAbortOnEveryWorker(run, run.F(0, 0), "make attempt 0 stale");
        var current = run.F(0, 1);
        run.ExpectRunStep(current);

        run.Compute(current, run.A);
        foreach (var stale in new[] { current with { Epoch = 2 }, current with { Attempt = 0 }, current with { Step = 1 } })
        {
            // A large loss: if a stale result were taken it would show in the committed loss.
            run.Compute(stale, run.A, lossSum: 1000);
            run.Compute(stale, run.B, lossSum: 1000);
        }
        run.Shard.ExpectNoMsg(Quiet);   // only A's current result counts so far
        run.Compute(current, run.B);
        run.NormsAndUpdate(current);

        var result = run.CompleteRun(1);
        Assert.Equal(4.0 / run.Config.Train.MicroBatchesPerStep, result.Steps[0].Loss);
    }

    [Fact]
    public void A_duplicate_StepComputed_from_one_stage_does_not_complete_the_compute_phase_without_the_other()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.Compute(run.F(0), run.A);
        run.Compute(run.F(0), run.A);
        run.Shard.ExpectNoMsg(Quiet);
        run.Compute(run.F(0), run.B);
        run.ExpectNormQuery(run.F(0));
    }

    [Fact]
    public void A_duplicate_UpdateApplied_from_one_stage_does_not_commit_the_step_without_the_other()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.ComputeAll(run.F(0));
        run.NormsThenExpectUpdate(run.F(0));

        run.Applied(run.F(0), run.A);
        run.Applied(run.F(0), run.A);
        run.ShardApplied(run.F(0));
        // Three answers for three units, but B has not applied: the step must not commit.
        run.ExpectQuiet(run.A.Stage, run.B.Stage);
        run.Applied(run.F(0), run.B);
        run.ExpectRunStep(run.F(1));
    }

    [Fact]
    public void A_duplicate_ParameterSummary_does_not_finish_the_run_without_the_missing_owner()
    {
        var run = NewRun(("train.steps", "1"));
        run.Start();
        run.CompleteAttempt(run.F(0));
        run.CompleteEval(1);
        run.ExpectReportParameters();
        run.Summary(run.A.Stage, run.A.Rank);
        run.Summary(run.A.Stage, run.A.Rank);
        run.Summary(run.Shard, run.A.Rank);
        // B's stage has not answered: the run must not complete yet.
        run.ExpectQuiet(run.A.Agent, run.B.Agent);
        Assert.False(run.Result.IsCompleted);
        run.Summary(run.B.Stage, run.B.Rank);
        Assert.Equal(2, run.ExpectShutdownOfAgents().Count);
        Assert.Equal(3, run.AwaitResult().FinalParameters.Count);
    }

    [Fact]
    public void A_retried_RegisterNode_is_acknowledged_again_without_counting_the_node_twice()
    {
        var run = NewRun();
        run.RegisterAccepted(run.A);
        // The agent retries every second until it hears back: the retry must not count as the second node.
        run.RegisterAccepted(run.A);
        run.A.Agent.ExpectNoMsg(Quiet);   // two nodes are needed: no plan yet

        run.RegisterAccepted(run.B);
        var plan = run.ExpectPlan();
        Assert.Equal(2, plan.Workers.Length);
        Assert.Equal([run.A.Address, run.B.Address], plan.Workers.Select(w => w.NodeAddress).Order());
        run.Install(plan);
        run.ExpectRunStep(run.F(0));

        // A retry that crosses the plan is still a known node: acknowledged, not refused, and no new plan.
        run.RegisterAccepted(run.B);
        run.ExpectQuiet(run.A.Agent, run.B.Agent);
    }

    [Fact]
    public void A_node_with_a_different_run_fingerprint_is_refused_with_the_difference_and_never_planned()
    {
        var run = NewRun();
        var other = run.Config with { Train = run.Config.Train with { Beta2 = 0.99 } };
        var otherFingerprint = TrainingState.RunFingerprint(other, CoordinatorRun.Corpus(other).Fingerprint);
        var differences = TrainingState.RunFingerprintDifferences(run.RunFingerprint, otherFingerprint);
        Assert.Equal("train.Beta2", Assert.Single(differences).Split(':')[0]);

        var c = new FakeNode(this, "node-c", 3003);
        run.Coordinator.Tell(c.Registration(run.Config, otherFingerprint), c.Agent.Ref);
        var refused = c.Agent.ExpectMsg<NodeRefused>(Wait);
        Assert.Equal(c.Address, refused.NodeAddress);
        // The reason names the setting that differs with both values (the node's first).
        Assert.Equal($"run config differs: train.Beta2: 0.99 vs {run.Config.Train.Beta2.ToString("R", System.Globalization.CultureInfo.InvariantCulture)}", refused.Reason);

        // The refused node does not count toward the two nodes the run waits for...
        run.RegisterAccepted(run.A);
        run.A.Agent.ExpectNoMsg(Quiet);
        // ...and is not in the plan, nor told about it.
        run.RegisterAccepted(run.B);
        var plan = run.ExpectPlan();
        Assert.DoesNotContain(plan.Workers, w => w.NodeAddress == c.Address);
        Assert.Equal(2, plan.Workers.Length);
        c.Agent.ExpectNoMsg(Quiet);
    }

    [Fact]
    public void A_node_with_another_tokenizer_is_refused_naming_the_tokenizer()
    {
        var run = NewRun();
        var other = run.Config with { Model = run.Config.Model with { Tokenizer = "gpt2", VocabSize = 50257 } };
        // The same data fingerprint, so that only the tokenizer (and the vocabulary it brings) differs.
        var otherFingerprint = TrainingState.RunFingerprint(other, CoordinatorRun.Corpus(run.Config).Fingerprint);
        var c = new FakeNode(this, "node-c", 3003);
        run.Coordinator.Tell(c.Registration(run.Config, otherFingerprint), c.Agent.Ref);
        var refused = c.Agent.ExpectMsg<NodeRefused>(Wait);
        Assert.Contains("model.Tokenizer: gpt2 vs bytes", refused.Reason);
        Assert.Contains("model.VocabSize: 50257 vs 256", refused.Reason);
    }

    // ---- 6. re-layout and stop -----------------------------------------------------------------

    [Fact]
    public void A_RequestRelayout_during_a_step_installs_a_one_worker_plan_after_that_step_commits()
    {
        var run = NewRun();
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.Coordinator.Tell(new RequestRelayout(1, 1), TestActor);
        // The step in flight finishes under the old plan.
        run.ComputeAll(run.F(0));
        var u = run.NormsAndUpdate(run.F(0));
        Assert.Equal(new Fence(1, 0, 0), u.Fence);

        var plan2 = run.ExpectPlan();
        Assert.Equal(2, plan2.Epoch);
        Assert.Equal(1L, plan2.StartStep);
        Assert.Single(plan2.Workers);
        Assert.Equal((1, 1), (plan2.Dp, plan2.Pp));
        Assert.Equal(2, plan2.Previous.Length);
        Assert.All(plan2.Moves, m => Assert.Equal(0, m.ToRank));
        // Both workers answer (the dropped one as idle, rank -1); with one worker no expert is shared.
        run.Install(plan2, withShard: false);
        var idle = Assert.Single(run.Nodes, n => n.Rank < 0);

        var result = run.CompleteRun(1);   // step 1 runs as e2/s1/a0 on the remaining worker only
        Assert.Equal([0L, 1L], result.Steps.Select(s => s.Step));
        Assert.Equal([1, 2], result.Plans.Select(p => p.Epoch));
        Assert.Equal((1L, 1), (result.Plans[1].AtStep, result.Plans[1].Dp));
        run.ExpectQuiet(idle.Stage, run.Shard);
    }

    [Fact]
    public void A_StopRun_during_a_step_finishes_the_run_right_after_that_step_commits()
    {
        var run = NewRun(("train.steps", "5"));
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.Coordinator.Tell(new StopRun("operator pressed ctrl-c"), TestActor);
        run.Coordinator.Tell(new StopRun("pressed again"), TestActor);   // repeating is harmless; the first reason stands
        run.ComputeAll(run.F(0));
        run.NormsAndUpdate(run.F(0));

        // The stopped run still ends like a finished one: evaluation, summaries, then the agents stop.
        run.CompleteEval(1);
        Assert.All(run.CompleteFinish(), r => Assert.Equal("the run was stopped: operator pressed ctrl-c", r));
        var result = run.AwaitResult();
        Assert.Equal([0L], result.Steps.Select(s => s.Step));
        run.ExpectQuiet(run.A.Stage, run.B.Stage);   // no step 1
    }

    [Fact]
    public void A_StopRun_before_any_plan_finishes_the_run_at_once()
    {
        var run = NewRun();
        run.RegisterAccepted(run.A);   // one of the two nodes the run waits for
        run.Coordinator.Tell(new StopRun("not needed after all"), TestActor);

        Assert.Equal("the run was stopped: not needed after all", run.A.Agent.ExpectMsg<Shutdown>(Wait).Reason);
        var result = run.AwaitResult();
        Assert.Empty(result.Steps);
        Assert.Empty(result.Plans);
        Assert.Empty(result.Validation);
        run.ExpectQuiet(run.A.Agent, run.B.Agent);
    }

    // ---- state checks --------------------------------------------------------------------------

    [Fact]
    public void Replicas_that_report_different_dense_checksums_stop_the_run_as_state_lost()
    {
        var run = NewRun(("train.steps", "1"), ("cluster.checksum-every", "1"));
        run.Start();
        run.ExpectRunStep(run.F(0));
        run.ComputeAll(run.F(0));
        Assert.True(run.NormsThenExpectUpdate(run.F(0)).Checksum);
        run.Applied(run.F(0), run.A, checksum: 0xAAAA);
        run.Applied(run.F(0), run.B, checksum: 0xBBBB);
        run.ShardApplied(run.F(0));

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.StateLost, ex.Kind);
        Assert.Contains("differ between data-parallel replicas", ex.Message);
        Assert.Contains("000000000000AAAA", ex.Message);
        Assert.Equal(2, run.ExpectShutdownOfAgents().Count);
    }

    [Fact]
    public void A_worker_that_cannot_install_the_plan_stops_the_run_as_state_lost()
    {
        var run = NewRun();
        run.RegisterAccepted(run.A);
        run.RegisterAccepted(run.B);
        // A failed install is planned again (a peer of the transfer may have died unnoticed), each time
        // under a new epoch; a failure that repeats past the retries stops the run.
        var plan = run.ExpectPlan();
        var epochs = new List<int>();
        for (int i = 0; i <= 3; i++)
        {
            if (i > 0) plan = run.ExpectPlan();
            epochs.Add(plan.Epoch);
            run.Coordinator.Tell(new PlanFailed(plan.Epoch, run.A.Info, "unit blocks.1 failed its checksum"), run.A.Worker.Ref);
        }
        Assert.Equal([1, 2, 3, 4], epochs);

        var ex = run.AwaitFailure();
        Assert.Equal(FailureKind.StateLost, ex.Kind);
        Assert.Contains("could not install plan 4", ex.Message);
        Assert.Contains("unit blocks.1 failed its checksum", ex.Message);
        Assert.Equal(2, run.ExpectShutdownOfAgents().Count);
    }

    // ---- helpers -------------------------------------------------------------------------------

    /// <summary>Every device worker of the plan (the PlanInstalled.Self refs) is told to abort exactly this attempt.</summary>
    private static void ExpectAbortOnEveryWorker(CoordinatorRun run, Fence fence, string reasonPart)
    {
        foreach (var n in run.Nodes)
        {
            var abort = n.Worker.ExpectMsg<AbortAttempt>(Wait);
            Assert.Equal(fence, abort.Fence);
            Assert.Contains(reasonPart, abort.Reason);
        }
    }

    /// <summary>
    /// Where in a step the loss is checked (before or after the norms phase) is the coordinator's choice:
    /// answer a norm query if one comes, until the run has ended.
    /// </summary>
    private static void AnswerNormQueriesUntilTheRunEnds(CoordinatorRun run)
    {
        var deadline = DateTime.UtcNow + Wait;
        while (!run.Result.IsCompleted && DateTime.UtcNow < deadline)
        {
            if (run.Shard.ReceiveOne(TimeSpan.FromMilliseconds(50)) is QueryExpertNorm q) run.Norm(q.Fence);
        }
    }
}
