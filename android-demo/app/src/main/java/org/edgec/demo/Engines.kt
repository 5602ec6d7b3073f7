package org.edgec.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import ai.onnxruntime.TensorInfo
import org.edgec.core.ChatEngine
import org.edgec.core.Engine
import org.edgec.core.GenerationStats
import org.edgec.core.Manifest
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule
import java.io.File
import java.nio.FloatBuffer
import java.nio.LongBuffer

/** The engines for a bundle's artifact: ids-level (self-test, benchmark) and text-level (chat). */
object Engines {
    fun open(manifest: Manifest, format: String? = null, threads: Int = 0): Engine {
        val artifact = manifest.artifact(format)
        val path = File(manifest.dir, artifact.path).path
        return when (artifact.format) {
            "pte" -> PteEngine(path)
            "onnx" -> OnnxEngine(path, manifest, threads)
            else -> throw IllegalArgumentException("${manifest.dir}: no engine for the ${artifact.format} format")
        }
    }

    fun openChat(manifest: Manifest): ChatEngine {
        val artifact = manifest.artifact()
        return if (artifact.format == "pte") LlmChat(manifest, File(manifest.dir, artifact.path).path)
        else GenAiChat(manifest.dir.path)
    }
}

/** A .pte through ExecuTorch's Module: forward(tokens [1, seq], input_pos [1]) -> last-position logits,
 * the KV cache held in the program (edgec's export follows ExecuTorch's LLM runner conventions). */
class PteEngine(path: String) : Engine {
    private val module = Module.load(path)
    override val name = "executorch"
    override val version = "android"

    override fun step(ids: LongArray, start: Int): FloatArray {
        val tokens = Tensor.fromBlob(ids, longArrayOf(1, ids.size.toLong()))
        val position = Tensor.fromBlob(longArrayOf(start.toLong()), longArrayOf(1))
        val out = module.forward(EValue.from(tokens), EValue.from(position))
        return out[0].toTensor().dataAsFloatArray.let { it.copyOfRange(it.size - vocab(it), it.size) }
    }

    private var vocabSize = 0
    private fun vocab(all: FloatArray): Int {
        if (vocabSize == 0) vocabSize = module.execute("get_vocab_size")[0].toInt().toInt()
        return minOf(vocabSize, all.size)
    }

    override fun close() = module.destroy()
}

/** An ONNX artifact through ONNX Runtime's Java API, for the self-test and benchmark (chat uses
 * onnxruntime-genai). Inputs as edgec exports them: input_ids, attention_mask, position_ids and
 * past_key_values.N.key/value (concatenated cache: each step's present is the next past). */
class OnnxEngine(path: String, manifest: Manifest, threads: Int) : Engine {
    private val env = OrtEnvironment.getEnvironment()
    private val session = env.createSession(path, OrtSession.SessionOptions().apply { if (threads > 0) setIntraOpNumThreads(threads) })
    private val kv = (manifest.json["artifacts"] as List<*>).map { it as Map<*, *> }.first { it["format"] == "onnx" }
        .let { ((it["io"] as Map<*, *>)["kv_cache"]) as Map<*, *> }
    private val layers = (kv["num_layers"] as Number).toInt()
    private val kvHeads = (kv["num_kv_heads"] as Number).toLong()
    private val headDim = (kv["head_dim"] as Number).toLong()
    private var past: Map<String, OnnxTensor> = emptyMap()
    override val name = "onnxruntime"
    override val version = OrtEnvironment.getEnvironment().version ?: "android"

    // edgec's default ONNX graph (--logits last) returns the last position's logits [1, 1, vocab] only.
    private val lastPositionOnly = (session.outputInfo["logits"]?.info as? TensorInfo)?.shape?.getOrNull(1) == 1L

    override fun step(ids: LongArray, start: Int): FloatArray = run(ids, start).last()

    override fun forwardAll(ids: LongArray, start: Int): Array<FloatArray> =
        if (lastPositionOnly) super.forwardAll(ids, start) else run(ids, start)

    private fun run(ids: LongArray, start: Int): Array<FloatArray> {
        if (start == 0) reset()
        val seq = ids.size.toLong()
        val inputs = HashMap<String, OnnxTensor>(past)
        inputs["input_ids"] = OnnxTensor.createTensor(env, LongBuffer.wrap(ids), longArrayOf(1, seq))
        inputs["attention_mask"] = OnnxTensor.createTensor(env, LongBuffer.wrap(LongArray(start + ids.size) { 1 }),
            longArrayOf(1, start + seq))
        inputs["position_ids"] = OnnxTensor.createTensor(env, LongBuffer.wrap(LongArray(ids.size) { start + it.toLong() }),
            longArrayOf(1, seq))
        session.run(inputs).use { result ->
            val logits = result.get("logits").get() as OnnxTensor
            val vocab = logits.info.shape[2].toInt()
            val flat = logits.floatBuffer
            val rows = Array(logits.info.shape[1].toInt()) { FloatArray(vocab).also { row -> flat.get(row) } }
            val next = HashMap<String, OnnxTensor>()
            for (i in 0 until layers) for (kind in listOf("key", "value")) {
                val present = result.get("present.$i.$kind").get() as OnnxTensor
                // Copied out: the result's tensors are freed with it.
                next["past_key_values.$i.$kind"] = OnnxTensor.createTensor(env, present.floatBuffer, present.info.shape)
            }
            inputs.values.forEach { if (it !in past.values) it.close() }
            past.values.forEach { it.close() }
            past = next
            return rows
        }
    }

    private fun reset() {
        past.values.forEach { it.close() }
        past = (0 until layers).flatMap { i -> listOf("key", "value").map { "past_key_values.$i.$it" } }.associateWith {
            OnnxTensor.createTensor(env, FloatBuffer.allocate(0), longArrayOf(1, kvHeads, 0, headDim))
        }
    }

    override fun close() {
        past.values.forEach { it.close() }
        session.close()
    }
}

/** Chat on a .pte through ExecuTorch's LlmModule (its tokenizer: the bundle's tokenizer.json). */
class LlmChat(manifest: Manifest, ptePath: String) : ChatEngine {
    private val module = LlmModule(LlmModule.MODEL_TYPE_TEXT, ptePath, File(manifest.dir, "tokenizer.json").path, 0.0f)

    override fun generate(prompt: String, maxNewTokens: Int, onPiece: (String) -> Unit): GenerationStats {
        val started = System.nanoTime()
        var first = 0L
        var pieces = 0
        module.generate(prompt, maxNewTokens, object : LlmCallback {
            override fun onResult(result: String) {
                if (first == 0L) first = System.nanoTime()
                pieces++
                onPiece(result)
            }
        }, false)
        val end = System.nanoTime()
        return GenerationStats(0, pieces, (first - started) / 1e9, (end - first) / 1e9)
    }

    override fun stop() = module.stop()
    override fun close() = module.resetNative()
}

/** Chat on an ONNX bundle through onnxruntime-genai, which runs edgec's bundle as it is (genai_config.json). */
class GenAiChat(bundleDir: String) : ChatEngine {
    private val model = ai.onnxruntime.genai.Model(bundleDir)
    private val tokenizer = ai.onnxruntime.genai.Tokenizer(model)
    @Volatile private var stopped = false

    override fun generate(prompt: String, maxNewTokens: Int, onPiece: (String) -> Unit): GenerationStats {
        stopped = false
        val ids = tokenizer.encode(prompt)
        val params = ai.onnxruntime.genai.GeneratorParams(model)
        params.setSearchOption("max_length", (ids.getSequence(0).size + maxNewTokens).toDouble())
        val generator = ai.onnxruntime.genai.Generator(model, params)
        val stream = tokenizer.createStream()
        val started = System.nanoTime()
        var first = 0L
        var count = 0
        generator.use {
            it.appendTokenSequences(ids)
            while (!it.isDone && !stopped) {
                it.generateNextToken()
                if (first == 0L) first = System.nanoTime()
                count++
                onPiece(stream.decode(it.getLastTokenInSequence(0)))
            }
        }
        val end = System.nanoTime()
        return GenerationStats(ids.getSequence(0).size, count, (first - started) / 1e9, (end - first) / 1e9)
    }

    override fun stop() { stopped = true }
    override fun close() { tokenizer.close(); model.close() }
}
