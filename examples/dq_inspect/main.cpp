// dq_inspect [--json] <checkpoint>: what a diffq checkpoint holds (see inspect.h).
#include "inspect.h"

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  return dq_inspect::run(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
