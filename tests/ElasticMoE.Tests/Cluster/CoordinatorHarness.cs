using Akka.Actor;
using Akka.TestKit;
using ElasticMoE.Configuration;
using ElasticMoE.Data;
using ElasticMoE.Runtime.Actors;
using ElasticMoE.Runtime.Hosting;
using ElasticMoE.Runtime.Protocol;
using ElasticMoE.Training;

namespace ElasticMoE.Tests.Cluster;

/// <summary>
/// A worker node as the coordinator sees it, made of test probes: the node agent (registration, plans,
/// shutdown), its one device worker (aborts) and that worker's pipeline stage (steps, updates, evals).
/// </summary>
public sealed class FakeNode
{
    public FakeNode(TestKitBase kit, string name, long uid)
    {
        Address = $"akka.tcp://elasticmoe@{name}.invalid:4053";
        Uid = uid;
        Agent = kit.CreateTestProbe($"{name}-agent");
        Worker = kit.CreateTestProbe($"{name}-worker");
        Stage = kit.CreateTestProbe($"{name}-stage");
        Info = new WorkerInfo(Address, 0, $"{name}.invalid:7000", uid);
    }

    public string Address { get; }
    public long Uid { get; }
    public TestProbe Agent { get; }
    public TestProbe Worker { get; }
    public TestProbe Stage { get; }
    public WorkerInfo Info { get; }

    /// <summary>This node's rank in the plan installed last (-1: idle, or no plan yet).</summary>
    public int Rank { get; set; } = -1;

    public RegisterNode Registration(ElasticMoEConfig config, string runFingerprint)
        => new(Address, [Info.DataEndpoint], TrainingState.Fingerprint(config.Model), config.Seed, Uid, runFingerprint);

    public override string ToString() => $"{Address} (rank {Rank})";
}

/// <summary>
/// One TrainingCoordinator under test with two fake nodes (one device each, so DP 2 with PP 1) and one
/// shared expert shard on node A. Helpers play every side of the step protocol; each waits with
/// <see cref="Wait"/> for what must arrive, so a slow machine makes a test slower, never wrong.
/// </summary>
public sealed class CoordinatorRun
{
    /// <summary>For messages that must arrive: generous, so load on a shared machine cannot fail a test.</summary>
    public static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    /// <summary>For messages that must not arrive: a wrong coordinator sends them within microseconds.</summary>
    public static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(300);

    /// <summary>The MoE layer the shared shard serves.</summary>
    public const int ShardOrdinal = 0;

    /// <summary>Settings every test starts from: two nodes, two steps, eval only at the end, every timeout long.</summary>
    private static readonly (string, string)[] Defaults =
    [
        ("cluster.nodes", "2"),
        ("cluster.devices", "1"),
        ("cluster.pipeline-stages", "1"),
        ("cluster.checksum-every", "0"),
        ("cluster.step-timeout", "300"),
        ("cluster.plan-timeout", "300"),
        ("cluster.eval-timeout", "300"),
        ("cluster.finish-timeout", "300"),
        ("train.steps", "2"),
        ("train.eval-every", "1000"),
    ];

    private readonly TestKitBase _kit;

    public ElasticMoEConfig Config { get; }
    public string RunFingerprint { get; }
    public IActorRef Coordinator { get; }
    public Task<RunResult> Result { get; }
    public FakeNode A { get; }
    public FakeNode B { get; }
    public TestProbe Shard { get; }

    /// <summary>The plan installed last.</summary>
    public InstallPlan? Plan { get; private set; }

    /// <summary>Whether the plan installed last has the shared shard (so steps have a norms phase).</summary>
    public bool ShardActive { get; private set; }

    public CoordinatorRun(TestKitBase kit, params (string Key, string Value)[] overrides)
    {
        _kit = kit;
        Config = TestSupport.SmallConfig([.. Defaults, .. overrides]);
        RunFingerprint = TrainingState.RunFingerprint(Config, Corpus(Config).Fingerprint);
        A = new FakeNode(kit, "node-a", 1001);
        B = new FakeNode(kit, "node-b", 2002);
        Shard = kit.CreateTestProbe("shard");
        var done = new TaskCompletionSource<RunResult>(TaskCreationOptions.RunContinuationsAsynchronously);
        Result = done.Task;
        Coordinator = kit.Sys.ActorOf(TrainingCoordinator.Props(Config, new TrainingReport(TextWriter.Null, null), done, RunFingerprint), "coordinator");
    }

    /// <summary>A tiny corpus: only its fingerprint matters here.</summary>
    public static TextCorpus Corpus(ElasticMoEConfig config)
        => TextCorpus.FromText("coordinator-tests", string.Concat(Enumerable.Repeat("the quick brown fox jumps over the lazy dog. ", 40)),
            config.Data.ValidationFraction, config.Model.Context);

    public IReadOnlyList<FakeNode> Nodes => [A, B];

    /// <summary>Nodes with a rank in the installed plan, by rank.</summary>
    public IReadOnlyList<FakeNode> Ranked => Nodes.Where(n => n.Rank >= 0).OrderBy(n => n.Rank).ToList();

    public Fence F(long step, int attempt = 0) => new(Plan!.Epoch, step, attempt);

    // ---- registration and plans ----------------------------------------------------------------

    public void Register(FakeNode node, string? runFingerprint = null)
        => Coordinator.Tell(node.Registration(Config, runFingerprint ?? RunFingerprint), node.Agent.Ref);

    public void RegisterAccepted(FakeNode node)
    {
        Register(node);
        Assert.Equal(node.Address, node.Agent.ExpectMsg<NodeAccepted>(Wait).NodeAddress);
    }

    /// <summary>The plan, which every registered agent must receive (identical).</summary>
    public InstallPlan ExpectPlan()
    {
        var a = A.Agent.ExpectMsg<InstallPlan>(Wait);
        var b = B.Agent.ExpectMsg<InstallPlan>(Wait);
        Assert.Equal(a.Epoch, b.Epoch);
        Assert.Equal(a.Workers, b.Workers);
        return a;
    }

    /// <summary>Answers PlanInstalled for both nodes: each finds its rank by identity, as a real worker does.</summary>
    public void Install(InstallPlan plan, bool withShard = true)
    {
        foreach (var n in Nodes)
        {
            n.Rank = Array.FindIndex(plan.Workers, w => w.NodeAddress == n.Address && w.SystemUid == n.Uid && w.Device == 0);
            bool hasShard = withShard && n == A && n.Rank >= 0;
            Coordinator.Tell(new PlanInstalled(plan.Epoch, n.Info, n.Rank, n.Worker.Ref, n.Stage.Ref,
                hasShard ? [ShardOrdinal] : [], hasShard ? [Shard.Ref] : [], 0, 0, 0), n.Worker.Ref);
        }
        Plan = plan;
        ShardActive = withShard && A.Rank >= 0;
    }

    /// <summary>Both nodes register and install the first plan (DP 2); returns it.</summary>
    public InstallPlan Start()
    {
        RegisterAccepted(A);
        RegisterAccepted(B);
        var plan = ExpectPlan();
        Assert.Equal(1, plan.Epoch);
        Assert.Equal(2, plan.Workers.Length);
        Install(plan);
        return plan;
    }

    // ---- one step ------------------------------------------------------------------------------

    public void ExpectRunStep(Fence fence)
    {
        foreach (var n in Ranked) Assert.Equal(fence, n.Stage.ExpectMsg<RunStep>(Wait).Fence);
    }

    /// <summary>Expert counts a stage reports: per MoE layer, tokens per expert (made up, but distinct per rank).</summary>
    public long[][] Counts(int rank)
        => Enumerable.Range(0, Plan!.ExpertOwner.Length)
            .Select(l => Enumerable.Range(0, Config.Model.MoE.RoutedExperts).Select(e => (long)(1 + e + l + 10 * rank)).ToArray()).ToArray();

    /// <summary>
    /// A stage's report: its micro-batches' losses (the first carries <paramref name="lossSum"/>, the others 0) and
    /// <paramref name="gradSumSq"/> as the norm of one parameter of its own.
    /// </summary>
    public StepComputed Computed(Fence fence, FakeNode node, double lossSum = 2.0, double gradSumSq = 3.0)
    {
        var mine = BatchAssignment.MicroBatchesFor(node.Rank / Plan!.Pp, Plan.Dp, Config.Train.MicroBatchesPerStep);
        // Only last stages compute losses.
        var losses = new double[node.Rank % Plan.Pp == Plan.Pp - 1 ? mine.Length : 0];
        if (losses.Length > 0) losses[0] = lossSum;
        return new(fence, node.Rank, lossSum, mine.Length, gradSumSq, Enumerable.Range(0, Plan.ExpertOwner.Length).ToArray(), Counts(node.Rank))
        {
            Losses = losses,
            FirstMicroBatch = mine.Length > 0 ? mine[0] : 0,
            Norms = new NamedSums([$"stage-{node.Rank}"], [gradSumSq]),
        };
    }

    public void Compute(Fence fence, FakeNode node, double lossSum = 2.0, double gradSumSq = 3.0)
        => Coordinator.Tell(Computed(fence, node, lossSum, gradSumSq), node.Stage.Ref);

    public void ComputeAll(Fence fence)
    {
        foreach (var n in Ranked) Compute(fence, n);
    }

    public void ExpectNormQuery(Fence fence) => Assert.Equal(fence, Shard.ExpectMsg<QueryExpertNorm>(Wait).Fence);

    public void Norm(Fence fence, double sumSq = 1.0)
        => Coordinator.Tell(new ExpertNorm(fence, A.Rank, ShardOrdinal, sumSq) { Norms = new NamedSums(["shard"], [sumSq]) }, Shard.Ref);

    /// <summary>The update, which every stage and the shard must receive, all alike; returns it.</summary>
    public ApplyUpdate ExpectUpdate(Fence fence)
    {
        var updates = Ranked.Select(n => n.Stage.ExpectMsg<ApplyUpdate>(Wait)).ToList();
        if (ShardActive) updates.Add(Shard.ExpectMsg<ApplyUpdate>(Wait));
        var first = updates[0];
        Assert.Equal(fence, first.Fence);
        foreach (var u in updates.Skip(1)) AssertSameUpdate(first, u);
        return first;
    }

    public static void AssertSameUpdate(ApplyUpdate expected, ApplyUpdate actual, bool sameFence = true)
    {
        if (sameFence) Assert.Equal(expected.Fence, actual.Fence);
        Assert.Equal(expected.Lr, actual.Lr);
        Assert.Equal(expected.ClipScale, actual.ClipScale);
        Assert.Equal(expected.Checksum, actual.Checksum);
        Assert.Equal(expected.ComputeAttempt, actual.ComputeAttempt);
        Assert.Equal(expected.LayerLoads.Length, actual.LayerLoads.Length);
        for (int l = 0; l < expected.LayerLoads.Length; l++) Assert.Equal(expected.LayerLoads[l], actual.LayerLoads[l]);
    }

    public void Applied(Fence fence, FakeNode node, ulong checksum = 0, bool already = false)
        => Coordinator.Tell(new UpdateApplied(fence, node.Rank, checksum, already ? 0 : 1, already ? 1 : 0), node.Stage.Ref);

    public void ShardApplied(Fence fence, bool already = false)
        => Coordinator.Tell(new UpdateApplied(fence, A.Rank, 0, already ? 0 : 1, already ? 1 : 0), Shard.Ref);

    public void ApplyAll(Fence fence)
    {
        foreach (var n in Ranked) Applied(fence, n);
        if (ShardActive) ShardApplied(fence);
    }

    /// <summary>Norms (when the plan has the shard) of an attempt whose StepComputed are all in; returns the update that follows, not yet applied.</summary>
    public ApplyUpdate NormsThenExpectUpdate(Fence fence)
    {
        if (ShardActive)
        {
            ExpectNormQuery(fence);
            Norm(fence);
        }
        return ExpectUpdate(fence);
    }

    /// <summary>Norms (when the plan has the shard) and update of an attempt whose StepComputed are all in.</summary>
    public ApplyUpdate NormsAndUpdate(Fence fence)
    {
        var u = NormsThenExpectUpdate(fence);
        ApplyAll(fence);
        return u;
    }

    /// <summary>An attempt from its RunStep to its commit, every worker answering as asked.</summary>
    public ApplyUpdate CompleteAttempt(Fence fence)
    {
        ExpectRunStep(fence);
        ComputeAll(fence);
        return NormsAndUpdate(fence);
    }

    // ---- end of the run ------------------------------------------------------------------------

    /// <summary>The evaluation after <paramref name="stepsDone"/> steps (fence of the next step, attempt 0).</summary>
    public void CompleteEval(long stepsDone, double lossSum = 1.0)
    {
        var fence = F(stepsDone);
        foreach (var n in Ranked)
        {
            Assert.Equal(fence, n.Stage.ExpectMsg<RunEval>(Wait).Fence);
            var mine = BatchAssignment.MicroBatchesFor(n.Rank / Plan!.Pp, Plan.Dp, Config.Train.EvalBatches);
            var losses = new double[n.Rank % Plan.Pp == Plan.Pp - 1 ? mine.Length : 0];
            if (losses.Length > 0) losses[0] = lossSum;
            Coordinator.Tell(new EvalComputed(fence, n.Rank, lossSum, 1) { Losses = losses, FirstBatch = mine.Length > 0 ? mine[0] : 0 }, n.Stage.Ref);
        }
    }

    /// <summary>Every owner of units is asked for its parameters; returns the askers' probes (stages, then the shard).</summary>
    public List<TestProbe> ExpectReportParameters()
    {
        var owners = Ranked.Select(n => n.Stage).ToList();
        if (ShardActive) owners.Add(Shard);
        foreach (var p in owners) Assert.Equal(Plan!.Epoch, p.ExpectMsg<ReportParameters>(Wait).Epoch);
        return owners;
    }

    public void Summary(TestProbe owner, int worker)
        => Coordinator.Tell(new ParameterSummary(worker, [$"{owner.Ref.Path.Name}.weight"], [1.0 + worker], [2.0 + worker]), owner.Ref);

    /// <summary>Final summaries from every owner, then every agent is told to shut down; returns the reasons.</summary>
    public List<string> CompleteFinish()
    {
        var owners = ExpectReportParameters();
        for (int i = 0; i < owners.Count; i++) Summary(owners[i], i);
        return ExpectShutdownOfAgents();
    }

    public List<string> ExpectShutdownOfAgents() => Nodes.Select(n => n.Agent.ExpectMsg<Shutdown>(Wait).Reason).ToList();

    /// <summary>Runs steps <paramref name="fromStep"/>.. to the end, the final evaluation and the finish; returns the result.</summary>
    public RunResult CompleteRun(long fromStep)
    {
        for (long s = fromStep; s < Config.Train.Steps; s++) CompleteAttempt(F(s));
        CompleteEval(Config.Train.Steps);
        CompleteFinish();
        return AwaitResult();
    }

    public RunResult AwaitResult() => Result.WaitAsync(Wait).GetAwaiter().GetResult();

    public TrainingFailedException AwaitFailure()
        => Assert.Throws<TrainingFailedException>(() => Result.WaitAsync(Wait).GetAwaiter().GetResult());

    /// <summary>Asserts that no probe of the run has anything waiting (for a short window each).</summary>
    public void ExpectQuiet(params TestProbe[] probes)
    {
        foreach (var p in probes) p.ExpectNoMsg(Quiet);
    }

    public TestProbe[] AllProbes => [A.Agent, A.Worker, A.Stage, B.Agent, B.Worker, B.Stage, Shard];
}

/// <summary>
/// A TestKit whose ActorSystem is configured as a cluster member exactly as a coordinator host is
/// (<see cref="ClusterNode.AkkaConfig"/>: cluster provider, MessagePack serializer) and joined to itself,
/// so the coordinator's cluster subscription works as in production.
/// </summary>
public abstract class CoordinatorTestKit : Akka.TestKit.Xunit2.TestKit
{
    protected CoordinatorTestKit(Xunit.Abstractions.ITestOutputHelper output)
        : base(ClusterNode.AkkaConfig(TestSupport.SmallConfig(), [ClusterNode.CoordinatorRole]), "coordtests", output)
    {
        var cluster = Akka.Cluster.Cluster.Get(Sys);
        cluster.Join(cluster.SelfAddress);
        AwaitCondition(() => cluster.SelfMember.Status == Akka.Cluster.MemberStatus.Up, TimeSpan.FromSeconds(20));
    }

    protected CoordinatorRun NewRun(params (string Key, string Value)[] overrides) => new(this, overrides);
}
