package org.edgec.core

import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** The parts that need no vectors from edgec: JSON, .npy parsing, statistics, prompt formats. */
class CoreTest {
    private fun npy(descr: String, shape: String, data: ByteArray): ByteArray {
        var header = "{'descr': '$descr', 'fortran_order': False, 'shape': $shape, }"
        while ((10 + header.length + 1) % 64 != 0) header += " "
        header += "\n"
        val out = ByteBuffer.allocate(10 + header.length + data.size).order(ByteOrder.LITTLE_ENDIAN)
        out.put(byteArrayOf(0x93.toByte(), 'N'.code.toByte(), 'U'.code.toByte(), 'M'.code.toByte(), 'P'.code.toByte(), 'Y'.code.toByte(), 1, 0))
        out.putShort(header.length.toShort()).put(header.toByteArray()).put(data)
        return out.array()
    }

    @Test
    fun jsonRoundTrip() {
        val text = """{"a": [1, 2.5, -3e-2, true, null, "x\"\n\u00e9"], "b": {}, "c": [], "d": NaN}"""
        val value = Json.parse(text)
        assertEquals(listOf(1L, 2.5, -0.03, true, null, "x\"\né"), value.list("a"))
        assertTrue((value.num("d") ?: 0.0).isNaN())
        val again = Json.parse(Json.write(value, indent = 2))
        assertEquals(value.list("a"), again.list("a"))
        assertEquals(emptyMap<String, Any?>(), again.obj("b"))
        assertThrows(Json.ParseError::class.java) { Json.parse("{\"a\": }") }
    }

    @Test
    fun npyLittleEndianInt64AndFloat32() {
        val longs = ByteBuffer.allocate(24).order(ByteOrder.LITTLE_ENDIAN).putLong(1).putLong(-2).putLong(1L shl 40).array()
        val a = Npy.read(npy("<i8", "(3,)", longs))
        assertEquals(listOf(1L, -2L, 1L shl 40), a.longs!!.toList())
        val floats = ByteBuffer.allocate(24).order(ByteOrder.LITTLE_ENDIAN)
        floatArrayOf(0.5f, -1f, 2f, 3f, 4f, 5f).forEach { floats.putFloat(it) }
        val b = Npy.read(npy("<f4", "(2, 3)", floats.array()))
        assertEquals(2, b.rows)
        assertEquals(3, b.columns)
        assertEquals(listOf(3f, 4f, 5f), b.row(1).toList())
        val error = assertThrows(IllegalArgumentException::class.java) { Npy.read(npy("<f8", "(1,)", ByteArray(8)), "x") }
        assertTrue(error.message!!.contains("<f8"), error.message)
    }

    @Test
    fun medianAndGateText() {
        assertEquals(2.0, Bench.median(listOf(3.0, 1.0, 2.0)))
        assertEquals(2.5, Bench.median(listOf(4.0, 1.0, 2.0, 3.0)))
        // Python's '%.3g', which compiler/validate.py's explanations use.
        assertEquals("0.001", SelfTest.g3(1e-3))
        assertEquals("1e-05", SelfTest.g3(1e-5))
        assertEquals("1.23e-05", SelfTest.g3(1.2345e-5))
        assertEquals("0.99", SelfTest.g3(0.99))
        assertEquals("1.25", SelfTest.g3(1.25))
        assertEquals("1.23e+03", SelfTest.g3(1234.0))
        assertEquals("100", SelfTest.g3(100.0))
        assertEquals("0.312", SelfTest.g3(0.3125))  // half-even, where String.format would say 0.313
        assertEquals("-2.5e-07", SelfTest.g3(-2.5e-7))
        val gate = SelfTest.Gate("kl_mean", "max", 1e-5, 3e-5)
        assertFalse(gate.passed)
        assertEquals("kl_mean = 3e-05, must be at most 1e-05 (3x the limit)", gate.explain())
    }

    @Test
    fun benchMediansWithAFakeClock() {
        var now = 0.0
        val engine = object : Engine {
            override val name = "fake"
            override val version = "0"
            override fun step(ids: LongArray, start: Int): FloatArray {
                now += 0.001 * ids.size  // 1 ms a token
                return FloatArray(8).also { it[(start + ids.size) % 8] = 1f }
            }
        }
        val spec = BenchSpec(promptTokens = 10, newTokens = 5, warmup = 1, repeats = 3, depths = listOf(0, 300))
        val byDepth = Bench.run(engine, spec, vocabSize = 8, clock = { now })
        assertEquals(listOf(0, 300), byDepth.map { it.depth })
        assertEquals(0.010, byDepth[0].prefillSeconds, 1e-9)
        assertEquals(1000.0, byDepth[1].prefillTokensPerSecond, 1e-6)  // the context fill is not timed
        assertEquals(1000.0, byDepth[0].decodeTokensPerSecond, 1e-6)
        val json = Bench.resultJson(mapOf("name" to "fake"), mapOf("name" to "phone"), mapOf("format" to "onnx"), spec,
            0.1, byDepth, 12.0, 42)
        assertEquals("edgec.bench/1", json["schema"])
        assertEquals(2, (json["by_depth"] as List<*>).size)
        assertEquals(123.0, Bench.peakRssMb("Name:\tx\nVmHWM:\t  125952 kB\n"), 1e-9)
    }

    @Test
    fun chatFormats() {
        val messages = listOf(ChatFormat.Message("system", "Be brief."), ChatFormat.Message("user", "Hi"))
        val chatml = ChatFormat.fromTemplate("{% for m in messages %}<|im_start|>{{ m.role }}...")
        assertEquals("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            chatml.format(messages))
        val inst = ChatFormat.fromTemplate("{{ bos_token }}[INST] ...", bos = "<s>", eos = "</s>")
        assertEquals("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", inst.format(messages))
        val llama3 = ChatFormat.fromTemplate("<|start_header_id|>", bos = "<|begin_of_text|>")
        assertTrue(llama3.format(messages).endsWith("<|start_header_id|>assistant<|end_header_id|>\n\n"))
        assertEquals("<s>Be brief.\nHi", ChatFormat.fromTemplate(null, bos = "<s>").format(messages))
    }
}
