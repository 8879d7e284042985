// A shared object imported `with { type: "file" }`: its path, inside dist/sgm once compiled.
declare module "*.so" {
  const path: string;
  export default path;
}
