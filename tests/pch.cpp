// Precompiled-header carrier for the diffq tests.
