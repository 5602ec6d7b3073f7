package org.edgec.core

/**
 * A small JSON reader and writer: the app reads manifest.json and tokenizer_config.json and writes the
 * bench and self-test JSON. Values are Map<String, Any?> (insertion-ordered), List<Any?>, String, Double,
 * Long, Boolean and null. Written here so that core has no dependency beyond the Kotlin standard library.
 */
object Json {
    class ParseError(message: String) : IllegalArgumentException(message)

    fun parse(text: String): Any? {
        val parser = Parser(text)
        val value = parser.value()
        parser.skipSpace()
        if (parser.pos != text.length) throw ParseError("unexpected text at offset ${parser.pos}")
        return value
    }

    fun write(value: Any?, indent: Int = 0): String = StringBuilder().also { append(it, value, indent, 0) }.toString()

    private class Parser(val text: String) {
        var pos = 0

        fun skipSpace() {
            while (pos < text.length && text[pos].isWhitespace()) pos++
        }

        fun value(): Any? {
            skipSpace()
            if (pos >= text.length) throw ParseError("unexpected end of JSON")
            return when (val c = text[pos]) {
                '{' -> obj()
                '[' -> array()
                '"' -> string()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                // Python's json writes NaN and Infinity bare (a bench of one token has no decode rate).
                'N' -> literal("NaN", Double.NaN)
                'I' -> literal("Infinity", Double.POSITIVE_INFINITY)
                else -> if (c == '-' || c.isDigit()) number() else throw ParseError("unexpected '$c' at offset $pos")
            }
        }

        private fun literal(word: String, result: Any?): Any? {
            if (!text.startsWith(word, pos)) throw ParseError("unexpected text at offset $pos")
            pos += word.length
            return result
        }

        private fun expect(c: Char) {
            skipSpace()
            if (pos >= text.length || text[pos] != c) throw ParseError("expected '$c' at offset $pos")
            pos++
        }

        private fun obj(): Map<String, Any?> {
            val result = LinkedHashMap<String, Any?>()
            expect('{')
            skipSpace()
            if (text.getOrNull(pos) == '}') return result.also { pos++ }
            while (true) {
                skipSpace()
                val key = string()
                expect(':')
                result[key] = value()
                skipSpace()
                if (text.getOrNull(pos) == ',') { pos++; continue }
                expect('}')
                return result
            }
        }

        private fun array(): List<Any?> {
            val result = ArrayList<Any?>()
            expect('[')
            skipSpace()
            if (text.getOrNull(pos) == ']') return result.also { pos++ }
            while (true) {
                result.add(value())
                skipSpace()
                if (text.getOrNull(pos) == ',') { pos++; continue }
                expect(']')
                return result
            }
        }

        private fun string(): String {
            expect('"')
            val out = StringBuilder()
            while (true) {
                if (pos >= text.length) throw ParseError("unterminated string")
                val c = text[pos++]
                when (c) {
                    '"' -> return out.toString()
                    '\\' -> {
                        when (val e = text[pos++]) {
                            'n' -> out.append('\n'); 't' -> out.append('\t'); 'r' -> out.append('\r')
                            'b' -> out.append('\b'); 'f' -> out.append('\u000c')
                            'u' -> { out.append(text.substring(pos, pos + 4).toInt(16).toChar()); pos += 4 }
                            else -> out.append(e)
                        }
                    }
                    else -> out.append(c)
                }
            }
        }

        private fun number(): Any {
            if (text.startsWith("-Infinity", pos)) return Double.NEGATIVE_INFINITY.also { pos += 9 }
            val start = pos
            while (pos < text.length && (text[pos].isDigit() || text[pos] in "+-.eE")) pos++
            val token = text.substring(start, pos)
            return if (token.any { it in ".eE" }) token.toDouble() else token.toLongOrNull() ?: token.toDouble()
        }
    }

    private fun append(out: StringBuilder, value: Any?, indent: Int, depth: Int) {
        val newline = if (indent > 0) "\n" + " ".repeat(indent * (depth + 1)) else ""
        val close = if (indent > 0) "\n" + " ".repeat(indent * depth) else ""
        val colon = if (indent > 0) ": " else ":"
        when (value) {
            null -> out.append("null")
            is String -> quote(out, value)
            is Boolean, is Int, is Long -> out.append(value.toString())
            is Double -> out.append(if (value.isNaN()) "NaN" else if (value.isInfinite()) (if (value > 0) "Infinity" else "-Infinity") else value.toString())
            is Float -> append(out, value.toDouble(), indent, depth)
            is Map<*, *> -> {
                out.append('{')
                value.entries.forEachIndexed { i, (k, v) ->
                    if (i > 0) out.append(',')
                    out.append(newline)
                    quote(out, k.toString())
                    out.append(colon)
                    append(out, v, indent, depth + 1)
                }
                if (value.isNotEmpty()) out.append(close)
                out.append('}')
            }
            is Iterable<*> -> {
                out.append('[')
                value.forEachIndexed { i, v ->
                    if (i > 0) out.append(',')
                    out.append(newline)
                    append(out, v, indent, depth + 1)
                }
                if (value.any()) out.append(close)
                out.append(']')
            }
            is DoubleArray -> append(out, value.toList(), indent, depth)
            is LongArray -> append(out, value.toList(), indent, depth)
            else -> quote(out, value.toString())
        }
    }

    private fun quote(out: StringBuilder, s: String) {
        out.append('"')
        for (c in s) {
            when {
                c == '"' -> out.append("\\\"")
                c == '\\' -> out.append("\\\\")
                c == '\n' -> out.append("\\n")
                c == '\r' -> out.append("\\r")
                c == '\t' -> out.append("\\t")
                c < ' ' -> out.append(String.format("\\u%04x", c.code))
                else -> out.append(c)
            }
        }
        out.append('"')
    }
}

/** Typed access to parsed JSON, with one-line errors that name the key. */
@Suppress("UNCHECKED_CAST")
fun Any?.obj(key: String): Map<String, Any?> =
    (this as? Map<String, Any?>)?.get(key) as? Map<String, Any?> ?: throw Json.ParseError("'$key' is not an object")

@Suppress("UNCHECKED_CAST")
fun Any?.list(key: String): List<Any?> =
    (this as? Map<String, Any?>)?.get(key) as? List<Any?> ?: throw Json.ParseError("'$key' is not a list")

fun Any?.str(key: String): String? = (this as? Map<*, *>)?.get(key) as? String

fun Any?.num(key: String): Double? = ((this as? Map<*, *>)?.get(key) as? Number)?.toDouble()
