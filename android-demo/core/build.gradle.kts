// Pure Kotlin/JVM: no Android imports, so the host can compile and test it (see the Makefile's
// android-core-test, which does the same with kotlinc and JUnit's console launcher, without Gradle).
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin { jvmToolchain(17) }

dependencies {
    testImplementation("org.junit.jupiter:junit-jupiter:5.9.2")
}

tasks.test {
    useJUnitPlatform()
    // The Python side writes the vectors (tests/test_android_core.py); without them those tests skip.
    System.getenv("EDGEC_ANDROID_VECTORS")?.let { environment("EDGEC_ANDROID_VECTORS", it) }
}
