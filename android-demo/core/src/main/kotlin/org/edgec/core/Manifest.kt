package org.edgec.core

import java.io.File
import java.security.MessageDigest

/** One file of a bundle as manifest.json records it. */
data class BundleFile(val name: String, val bytes: Long, val sha256: String)

/** One artifact of a bundle: its format (onnx, pte), path, precision. */
data class Artifact(val format: String, val path: String, val precision: String)

/** A bundle's manifest.json: what the app needs to pick an engine and trust the files it loads. */
class Manifest(val dir: File, val json: Map<String, Any?>) {
    val files: List<BundleFile> = json.obj("files").map { (name, value) ->
        BundleFile(name, value.num("bytes")?.toLong() ?: -1, value.str("sha256") ?: "")
    }
    val artifacts: List<Artifact> = json.list("artifacts").map {
        Artifact(it.str("format") ?: "", it.str("path") ?: "", it.str("precision") ?: "fp32")
    }

    fun artifact(format: String? = null): Artifact = artifacts.firstOrNull { format == null || it.format == format }
        ?: throw IllegalArgumentException("${dir.path}: no ${format ?: "runnable"} artifact in this bundle " +
            "(formats here: ${artifacts.joinToString { it.format }.ifEmpty { "none" }})")

    /** Files whose size or sha256 differs from the manifest (or that are missing): empty when intact. */
    fun verify(): List<String> = files.mapNotNull { f ->
        val file = File(dir, f.name)
        when {
            !file.isFile -> "${f.name}: missing"
            file.length() != f.bytes -> "${f.name}: ${file.length()} bytes, manifest says ${f.bytes}"
            sha256(file) != f.sha256 -> "${f.name}: sha256 differs from the manifest"
            else -> null
        }
    }

    companion object {
        const val FILE = "manifest.json"

        fun load(dir: File): Manifest {
            val file = File(dir, FILE)
            require(file.isFile) { "${dir.path}: no $FILE; pick the directory `edgec build --out` wrote" }
            @Suppress("UNCHECKED_CAST")
            val json = Json.parse(file.readText()) as? Map<String, Any?>
                ?: throw IllegalArgumentException("${file.path}: not a JSON object")
            return Manifest(dir, json)
        }

        fun sha256(file: File): String {
            val digest = MessageDigest.getInstance("SHA-256")
            file.inputStream().use { input ->
                val buffer = ByteArray(1 shl 20)
                while (true) {
                    val n = input.read(buffer)
                    if (n < 0) break
                    digest.update(buffer, 0, n)
                }
            }
            return digest.digest().joinToString("") { "%02x".format(it) }
        }
    }
}
