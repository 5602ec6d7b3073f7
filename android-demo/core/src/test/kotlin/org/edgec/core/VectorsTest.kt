package org.edgec.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Assumptions.assumeTrue
import org.junit.jupiter.api.Test
import java.io.File
import java.nio.file.Files

/**
 * Against vectors written by edgec (tests/test_android_core.py): a real validated bundle with its
 * golden.npz, an artifact's recorded logits with the metrics and verdict Python computed from them, and a
 * bench result from `edgec bench --json`. Skipped without EDGEC_ANDROID_VECTORS.
 */
class VectorsTest {
    private val dir: File? = System.getenv("EDGEC_ANDROID_VECTORS")?.let(::File)
    private val vectors: Any? by lazy { Json.parse(File(dir, "vectors.json").readText()) }
    private val bundle: File by lazy { File(vectors.str("bundle")!!) }

    private fun need() = assumeTrue(dir != null, "EDGEC_ANDROID_VECTORS is not set (tests/test_android_core.py sets it)")

    /** Replays recorded logits and greedy tokens as an engine would compute them. */
    private class Replay(val prompts: List<LongArray>, val logits: List<NpyArray>, val tokens: List<LongArray>) : Engine {
        override val name = "replay"
        override val version = "0"
        private var current = -1

        override fun forwardAll(ids: LongArray, start: Int): Array<FloatArray> {
            if (start == 0) current = prompts.indexOfFirst { p -> p.size >= ids.size && ids.indices.all { p[it] == ids[it] } }
            return Array(ids.size) { logits[current].row(start + it) }
        }

        override fun step(ids: LongArray, start: Int): FloatArray = forwardAll(ids, start).last()

        override fun greedy(prompt: LongArray, newTokens: Int, eosIds: Set<Long>): LongArray =
            tokens[prompts.indexOfFirst { it.contentEquals(prompt) }]
    }

    @Test
    fun manifestChecksEveryFile() {
        need()
        val manifest = Manifest.load(bundle)
        assertEquals(emptyList<String>(), manifest.verify())
        assertEquals("onnx", manifest.artifact().format)
        val copy = Files.createTempDirectory("edgec-bundle").toFile()
        try {
            bundle.listFiles()!!.forEach { it.copyTo(File(copy, it.name)) }
            val onnx = File(copy, "model.onnx")
            val bytes = onnx.readBytes()
            bytes[bytes.size / 2] = (bytes[bytes.size / 2].toInt() xor 1).toByte()
            onnx.writeBytes(bytes)
            File(copy, "tokenizer.json").delete()
            assertEquals(listOf("model.onnx: sha256 differs from the manifest", "tokenizer.json: missing"),
                Manifest.load(copy).verify().sorted())
        } finally {
            copy.deleteRecursively()
        }
    }

    @Test
    fun goldenReplayPassesEveryGate() {
        need()
        val golden = Golden.load(File(bundle, Golden.FILE))
        golden.prompts.indices.forEach { assertEquals(golden.prompts[it].size, golden.logits[it].rows) }
        val result = SelfTest.compare(Replay(golden.prompts, golden.logits, golden.tokens), golden)
        assertEquals(0.0, result.metrics["max_abs_logits"])
        assertEquals(1.0, result.metrics["perplexity_ratio"]!!, 1e-12)
        val verdict = SelfTest.gateResults(result.metrics, SelfTest.gates("fp32"))
        assertEquals(true, verdict["passed"], verdict["failures"].toString())
    }

    @Test
    fun perturbedLogitsGiveEdgecsMetricsAndVerdict() {
        need()
        val golden = Golden.load(File(bundle, Golden.FILE))
        val recorded = Npy.readNpz(File(dir, vectors.str("artifact")!!))
        val engine = Replay(golden.prompts, golden.prompts.indices.map { recorded.getValue("logits_$it") },
            golden.prompts.indices.map { recorded.getValue("tokens_$it").longs!! })
        val result = SelfTest.compare(engine, golden)
        val expected = vectors.obj("expected")
        for ((key, value) in expected.obj("metrics")) {
            val want = (value as Number).toDouble()
            assertEquals(want, result.metrics.getValue(key), 1e-9 * maxOf(1.0, Math.abs(want)), key)
        }
        val perPrompt = expected.list("prompts")
        for ((i, prompt) in perPrompt.withIndex()) {
            assertEquals(prompt.num("greedy_first_divergence"), (result.perPrompt[i]["greedy_first_divergence"] as Long?)?.toDouble())
        }
        val verdict = SelfTest.gateResults(result.metrics, SelfTest.gates("fp32", SelfTest.gateOverrides(Manifest.load(bundle))))
        val want = expected.obj("verdict")
        assertEquals(want["passed"], verdict["passed"])
        assertEquals(want["summary"], verdict["summary"])
        assertEquals(want["failures"], verdict["failures"])
    }

    @Test
    fun edgecBenchJsonMediansAgreeAndOursIsWritten() {
        need()
        val python = Json.parse(File(vectors.str("bench_json")!!).readText())
        assertEquals(Bench.SCHEMA, python.str("schema"))
        val spec = python.obj("spec")
        for (entry in python.list("by_depth")) {
            val samples = entry.obj("samples")
            @Suppress("UNCHECKED_CAST")
            fun values(key: String) = (samples[key] as List<Number>).map { it.toDouble() }
            val depth = DepthResult((entry.num("depth")!!).toInt(), values("prefill_s"), values("ttft_s"), values("decode_s"),
                BenchSpec(spec.num("prompt_tokens")!!.toInt(), spec.num("new_tokens")!!.toInt()))
            assertEquals(entry.num("prefill_tokens_per_s")!!, depth.prefillTokensPerSecond, 1e-9 * depth.prefillTokensPerSecond)
            assertEquals(entry.num("decode_tokens_per_s")!!, depth.decodeTokensPerSecond, 1e-9 * depth.decodeTokensPerSecond)
            assertEquals(entry.num("ttft_s")!!, depth.ttftSeconds, 1e-12)
        }
        // A result as the app writes it, from recorded logits, for `edgec report` to read back.
        val golden = Golden.load(File(bundle, Golden.FILE))
        var now = 0.0
        val engine = object : Engine {
            override val name = "replay"
            override val version = "0"
            override fun step(ids: LongArray, start: Int): FloatArray { now += 0.002 * ids.size; return golden.logits[0].row(0) }
        }
        val benchSpec = BenchSpec(promptTokens = 8, newTokens = 4, warmup = 0, repeats = 2, depths = listOf(0, 16))
        val byDepth = Bench.run(engine, benchSpec, golden.logits[0].columns) { now }
        val manifest = Manifest.load(bundle)
        val result = Bench.resultJson(
            linkedMapOf("name" to "kotlin-core-test", "version" to "0", "threads" to 1),
            linkedMapOf("name" to "adb:test", "kind" to "adb", "arch" to "arm64-v8a", "cpu_count" to 8, "cpu_model" to "test",
                "cpu_features" to listOf("asimd", "asimddp")),
            linkedMapOf("path" to bundle.path, "format" to "onnx", "manifest_sha256" to Manifest.sha256(File(bundle, Manifest.FILE))),
            benchSpec, 0.05, byDepth, 100.0, manifest.files.sumOf { it.bytes })
        File(vectors.str("kotlin_bench_out")!!).writeText(Json.write(result, indent = 2))
        assertTrue(File(vectors.str("kotlin_bench_out")!!).length() > 0)
    }

    @Test
    fun bundlePromptFormat() {
        need()
        val format = ChatFormat.fromBundle(bundle)
        assertTrue(format.format(listOf(ChatFormat.Message("user", "Hi"))).endsWith("Hi"))
    }
}
